"""Reading records from a local file, a Hugging Face dataset or the synthetic world.

``load_records(config, kind)`` is the one entry point: raw rows -> column mapping -> converter -> record of
the requested kind -> the paper's 20/40/40 portion -> a held-out share. Bad rows raise ``DataError`` naming
the file, the row and the field, or, with ``on_error: skip``, are counted in the returned ``LoadReport``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmrlhf.config import DataConfig, InputError
from pmrlhf.data.records import FORMATS, Record, RowError, as_record, detect_format

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PORTIONS = {"sft": (0.0, 0.2), "reward": (0.2, 0.6), "rl": (0.6, 1.0), "all": (0.0, 1.0)}


class DataError(InputError):
    """Bad input: names the source, the row (1-based, as a person counts) and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str):
        where = source + (f": row {row}" if row is not None else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.field = source, row, field


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    portion: str = "all"  # the part of the paper's split the rows were taken from
    limit: int | None = None  # data.limit, where it cut the rows

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} of {self.rows} rows kept"
        why = []
        if self.skipped:
            why.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()))
        if self.portion != "all":
            share = round(100 * (PORTIONS[self.portion][1] - PORTIONS[self.portion][0]))
            why.append(f"data.portion: {self.portion}, its {share} % of the paper's 20/40/40 split")
        if self.limit is not None and self.kept == self.limit:
            why.append(f"data.limit: {self.limit}")
        return text + (f" ({'; '.join(why)})" if why else "")


def iter_rows(source: str, hf_split: str = "train", hf_config: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw rows of a local file (by suffix) or of a Hugging Face dataset (any other name)."""
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(source, None, None, "file not found")
        yield from _iter_local(path)
        return
    # a file name (data.tsv, rows.txt) is not a Hub dataset (owner/name); asking the Hub would only time out
    if path.exists() or (path.suffix[1:].isalpha() and len(path.suffix) <= 9):
        raise DataError(
            source, None, None, f"unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    import datasets

    offline_unless_hub_answers()
    try:
        ds = datasets.load_dataset(source, hf_config, split=hf_split)
    except Exception as e:  # offline, unknown name, private: the library's many error types say one thing here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            source,
            None,
            None,
            f"could not load it from the Hugging Face Hub ({reason}); without a network, set data.source to a "
            f"local {', '.join(LOCAL_SUFFIXES)} file",
        ) from None
    yield from ds


def offline_unless_hub_answers(timeout: float = 3.0) -> None:
    """Put the Hugging Face libraries offline, once per process, when the Hub (``HF_ENDPOINT``) takes no connection
    within ``timeout`` seconds: otherwise each load retries for 30-50 s before failing, and offline a name still
    loads from the local cache."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    global _hub_checked
    if _hub_checked or hub.HF_HUB_OFFLINE:
        return
    _hub_checked = True
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        import datasets.config

        hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True


_hub_checked = False


def _iter_local(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for raw in f:
                # a line that is no row is yielded as its RowError, which data.on_error raises or skips as any other
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RowError("", f"not UTF-8 text (byte {e.start} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield RowError("", f"not valid JSON: {e.msg}")
                    continue
                yield row if isinstance(row, dict) else RowError("", "each line must be a JSON object")
    elif path.suffix == ".json":
        try:
            data = json.loads(_utf8(path))
        except json.JSONDecodeError as e:
            raise DataError(str(path), None, None, f"not valid JSON: {e.msg} at line {e.lineno}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(str(path), None, None, "expected a list of objects (or {'data': [...]})")
        yield from data
    elif path.suffix == ".csv":
        yield from csv.DictReader(io.StringIO(_utf8(path), newline=""))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()


def _utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, None, f"not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def portion_of(index: int, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for a row: the same on every run, machine and Python."""
    digest = hashlib.sha256(f"pmrlhf-split:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_indices(n: int, portion: str, seed: int = 0) -> list[int]:
    """Row indices of ``portion`` in the paper's 20 / 40 / 40 split (SFT / reward / RL), Sec. 6.

    Rows are ordered by a hash of (seed, index) and cut at exactly 20 % and 60 %, so the three portions are
    disjoint, cover every row and have sizes ``floor``-exact for any ``n``.
    """
    if portion not in PORTIONS:
        raise ValueError(f"unknown portion {portion!r}; use one of {sorted(PORTIONS)}")
    lo, hi = PORTIONS[portion]
    order = sorted(range(n), key=lambda i: portion_of(i, seed))
    return sorted(order[int(lo * n) : int(hi * n)])


def _labeler(row: dict[str, Any]) -> dict[str, str]:
    """Who labelled a comparison, where the data names them (a ``labeler`` column, or ``data.columns.labeler``)."""
    return {"labeler": str(row["labeler"])} if row.get("labeler") is not None else {}


def load_records(config: DataConfig, kind: str, source: str | None = None) -> tuple[list[Record], LoadReport]:
    """Every record of ``kind`` from ``source`` (default ``config.source``), after the portion and ``limit``."""
    source = source or config.source
    if config.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {config.on_error!r}")
    rename = {theirs: ours for ours, theirs in config.columns.items()}
    report = LoadReport(source, portion=config.portion, limit=config.limit)
    converter = None if config.format == "auto" else FORMATS.get(config.format)
    if config.format != "auto" and converter is None:
        raise ValueError(f"unknown data.format {config.format!r}; known: auto, {', '.join(sorted(FORMATS))}")
    records: list[Record | None] = []
    for i, raw in enumerate(iter_rows(source, config.hf_split, config.hf_config), 1):
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            row = {rename.get(k, k): v for k, v in raw.items()}
            if converter is None:
                converter = FORMATS[detect_format(row)]
            records.append(as_record(converter(row) | _labeler(row), kind))
        except RowError as e:
            if config.on_error == "raise":
                raise DataError(source, i, e.field, e.message) from None
            report.skipped[f"{e.field}: {e.message}" if e.field else e.message] += 1
            records.append(None)  # keeps row positions, so the split does not depend on which rows are bad
    keep = (
        range(len(records))
        if config.portion == "all"
        else split_indices(len(records), config.portion, config.split_seed)
    )
    out = [records[i] for i in keep if records[i] is not None]
    if config.limit is not None:
        out = out[: config.limit]
    report.kept = len(out)
    if not out:
        raise DataError(source, None, None, f"no usable {kind} records ({report.summary()})")
    return out, report


def holdout(records: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split records into (train, held-out) by the same stable hash; at least one of each when possible."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    n_eval = min(max(1 if fraction > 0 and len(records) > 1 else 0, round(fraction * len(records))), len(records) - 1)
    order = sorted(range(len(records)), key=lambda i: portion_of(i, seed + 7919))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
