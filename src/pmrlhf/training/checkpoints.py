"""Checkpoints a training loop resumes from exactly, shared by the stages that train with their own loop.

A checkpoint is a folder ``<root>/<prefix>-NNNNNN/`` written atomically: every process writes into one hidden
folder (accelerate's ``save_state``: models, optimisers and every process's RNG, each process its own shards
where they are sharded; plus ``state.pt``, the loop's own state and the run's config, from the main process),
renamed into place once all are done. A crash leaves at most an unfinished hidden folder, which resuming ignores
and the next save replaces. Resuming refuses a checkpoint of another run, naming the settings that differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pmrlhf.config import InputError, to_dict
from pmrlhf.io import MetricsLog, atomic_write_text, console, no_space, replace_dir

# Settings a resumed run may change: how often it checkpoints and logs, where its folder is, and the flag itself.
MAY_CHANGE = ("resume", "checkpoint_every", "keep_checkpoints", "logging", "run_dir")


def save(accelerator, root: Path, name: str, state: dict, keep: int, per_process: dict | None = None) -> Path:
    """Write ``root/name`` (``state`` from the main process, ``per_process`` files from each) and keep the newest
    ``keep`` checkpoints."""
    path, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)  # torch's format keeps tied weights tied
        for filename, obj in (per_process or {}).items():
            torch.save(obj, tmp / f"{filename}_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(state, tmp / "state.pt")
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its writer
        full = no_space(e, root)  # asked before the half-written checkpoint goes and frees its space
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint would only fill the disk further
        if full:
            raise ValueError(
                f"no space left on the device while writing checkpoint {name}: removed the unfinished one; the "
                "earlier checkpoints are kept. Free space, or lower keep_checkpoints"
            ) from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, path)
        prefix = name.rsplit("-", 1)[0]
        for old in sorted(root.glob(f"{prefix}-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load(accelerator, root: Path, prefix: str, config: dict, may_change: tuple[str, ...]) -> tuple[dict, Path] | None:
    """The newest ``root/prefix-*`` checkpoint loaded into the prepared models and optimisers: ``(state, path)``,
    or None where there is none. A folder without ``state.pt`` (written last, so a checkpoint emptied or cut short
    by hand) is passed over for the one before; a file that cannot be read is named. Refuses a checkpoint whose run
    had other settings than ``config`` outside ``may_change`` (top-level keys)."""
    found = sorted(root.glob(f"{prefix}-*"))
    while found and not (found[-1] / "state.pt").is_file():
        console.print(f"[yellow]resume: {found[-1]} is not a whole checkpoint (no state.pt): using the one before[/]")
        found.pop()
    if not found:
        console.print("[yellow]resume: no checkpoint found, starting from the beginning[/yellow]")
        return None
    state = readable(found[-1], lambda: torch.load(found[-1] / "state.pt", weights_only=False, map_location="cpu"))
    check_same_run(found[-1], state.get("config"), config, may_change)
    readable(found[-1], lambda: accelerator.load_state(str(found[-1])))  # and this process's RNG states
    return state, found[-1]


def per_process(path: Path, filename: str, accelerator):
    """This process's ``filename`` file of the checkpoint at ``path``."""
    file = path / f"{filename}_{accelerator.process_index}.pt"
    return readable(path, lambda: torch.load(file, weights_only=False, map_location="cpu"))


def readable(checkpoint: Path, load):
    """``load()``, or where a file of ``checkpoint`` is missing or cannot be read, one line naming it (``blame``)."""
    try:
        return load()
    except Exception as e:  # every reader has its own error type; re-raised where no file is at fault
        blame(checkpoint, e)
        raise


def blame(checkpoint: Path, error: Exception) -> None:
    """Where ``error`` came from a file of ``checkpoint`` that is missing or cannot be read, refuse the resume in one
    line naming it: the libraries' own errors name no file, and an empty one made the command line print only
    "Aborted"."""
    missing = getattr(error, "filename", None)
    if isinstance(error, FileNotFoundError) and missing and Path(missing).parent == checkpoint:
        file, reason = Path(missing), "missing"
    else:
        file, reason = unreadable_file(checkpoint) or (None, "")
    if file is not None:
        raise InputError(
            f"{checkpoint}: {file.name} cannot be read ({reason}): remove {checkpoint} to resume from the checkpoint "
            "before it, or run without --resume to start afresh"
        ) from None


def unreadable_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a checkpoint ``folder`` that its reader refuses, with the reason; None where all read."""
    from safetensors import safe_open

    readers = {
        ".json": lambda f: json.loads(f.read_text()),
        ".safetensors": lambda f: safe_open(str(f), "pt").keys(),
    }
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        read = readers.get(file.suffix, lambda f: torch.load(f, weights_only=False, map_location="cpu"))
        if file.suffix in (*readers, ".pt", ".bin", ".pth", ".pkl"):  # accelerate's RNG states are torch's too
            try:
                read(file)
            except Exception as e:
                return file, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty or cut short'}"
    return None


def move_aside(root: Path, prefix: str) -> None:
    """A run started afresh in a folder holding an earlier run's checkpoints would prune them as it writes its own,
    and a later resume could take either: they move to ``<root>-replaced-N`` first."""
    if not any(root.glob(f"{prefix}-*")):
        return
    n = 1 + sum(1 for _ in root.parent.glob(f"{root.name}-replaced-*"))
    aside = root.with_name(f"{root.name}-replaced-{n}")
    root.rename(aside)
    console.print(f"[yellow]{root} held an earlier run's checkpoints (no resume): moved to {aside}[/yellow]")


def check_same_run(checkpoint: Path, saved: dict | None, config: dict, may_change: tuple[str, ...]) -> None:
    """Refuse to resume from a checkpoint of another run: every setting but ``may_change`` must match."""
    if saved is None:
        raise InputError(f"{checkpoint} records no config (written by an older version): it cannot be resumed safely")
    differ = differences(saved, config, may_change)
    if differ:
        raise InputError(
            f"{checkpoint} belongs to another run: {'; '.join(differ)}. Resume with its settings, or start afresh"
        )


def differences(saved: dict, config: dict, may_change: tuple[str, ...], defaults: dict | None = None) -> list[str]:
    """Every setting of ``config`` (but the sections ``may_change``) that ``saved`` records otherwise, as
    ``key = saved there, asked here``. With ``defaults``, a setting ``saved`` does not record (one added since it
    was written) is the same where it is asked at its default, which keeps what the code did before."""
    before, default = _flat(saved), _flat(defaults or {})
    return [
        f"{key} = {before.get(key)!r} there, {value!r} here"
        for key, value in _flat(config).items()
        if key.split(".")[0] not in may_change
        and before.get(key) != value
        and not (key not in before and key in default and default[key] == value)
    ]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def truncated_metrics(path: Path, step: int) -> str:
    """The lines of ``metrics.jsonl`` up to ``step``: what a run resumed there keeps of its log. A last line cut
    short (a run killed while writing it) is dropped; a line spoilt elsewhere is named."""
    if not (path.exists() and step):
        return ""
    lines, rows = path.read_text().splitlines(keepends=True), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise InputError(f"{path}: line {number} is not JSON ({e.msg}): mend or remove that line") from None
    return "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step)


def begin(accelerator, out: Path, config, prefix: str, may_change: tuple[str, ...], run_name: str | None = None):
    """Start or resume a stage's loop in ``out``: ``(found, log)``. With ``config.resume``, ``found`` is the newest
    checkpoint's ``(state, path)`` (None without one); without, earlier checkpoints move aside. ``log`` (the main
    process's ``MetricsLog``, None elsewhere) keeps the lines up to the resumed step and appends after them."""
    root, found = out / "checkpoints", None
    if config.resume:
        found = load(accelerator, root, prefix, to_dict(config), may_change)
    elif accelerator.is_main_process:
        move_aside(root, prefix)
    accelerator.wait_for_everyone()
    log = metrics_log(out, config, found[0]["step"] if found else 0, run_name) if accelerator.is_main_process else None
    return found, log


def metrics_log(out: Path, config, step: int, run_name: str | None = None) -> MetricsLog:
    """The stage's ``MetricsLog`` (main process only), keeping the lines of ``metrics.jsonl`` up to ``step`` (where
    a resumed run picks up; 0 keeps none) and appending after them."""
    metrics = out / "metrics.jsonl"
    atomic_write_text(metrics, truncated_metrics(metrics, step))
    c = config.logging
    return MetricsLog(metrics, c.tensorboard, c.wandb, c.wandb_project, run_name=run_name, resume=True)


def loop_state(config, step: int, epoch_rng, batch: int, scheduler, **extra) -> dict:
    """What a stage's epoch loop needs to resume after ``step``: the order of the epoch it is in (``epoch_rng``,
    the shuffling state the epoch started from), the next batch in it, the schedule, and the run's config."""
    return {
        "step": step,
        "rng": epoch_rng,
        "batch": batch,
        "scheduler": scheduler.state_dict(),
        "config": to_dict(config),
        **extra,
    }


def resume_loop(state: dict, rng, scheduler) -> tuple[int, int]:
    """Put ``rng`` and ``scheduler`` back as ``loop_state`` saved them: ``(step, first batch of the epoch)``."""
    rng.setstate(state["rng"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["batch"]
