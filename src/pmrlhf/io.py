"""Files a run writes: atomic text/JSON writes, atomic folder replacement, and the metrics log."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

# What the stages say to a person goes to stderr, so that stdout carries only what a command prints as its result.
console = Console(stderr=True)


def progress_bar(disable: bool = False):
    """The progress bar of a long loop: what it does, how far, the time taken and the time left (``disable`` it on
    every process but the one that speaks)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),  # a finished bar shows how long it took; the time left alone ended at 0:00:00
        TextColumn("left"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, disable=disable)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _as_created(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def no_space(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` came from a full disk under ``folder``. An OSError says so by its number and safetensors in
    words, but torch's writer reports a short write only as "unexpected pos": there the disk's free space decides."""
    import errno

    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return True
    if not isinstance(error, RuntimeError):
        return False
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free < 1 << 20


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _as_created(path: Path | str, mode: int) -> None:
    """Give a temporary file or folder the permissions an ordinary one gets (``mode`` less the umask): tempfile
    makes them private (0600, 0700), and a report or model written through one stayed unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_dir(path: Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Fill a fresh temporary folder with ``write(tmp)`` and swap it in for ``path`` in one rename.

    A crash half-way leaves the previous ``path`` (if any) untouched. With ``replace=False`` a ``path`` that
    exists by then is kept and the new folder dropped: processes that all write the same folder at once leave
    the first one finished, and none of them ever sees it swapped under it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp."))
    try:
        _as_created(tmp, 0o777)
        write(tmp)
        if replace:
            replace_dir(tmp, path)
        else:
            try:
                os.rename(tmp, path)  # refused when another process has put a (non-empty) folder there
            except OSError:
                if not path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(tmp: Path, path: Path) -> Path:
    """Put the finished folder ``tmp`` (on the same file system) at ``path``, replacing what was there.

    Where the kernel and file system can (Linux's ``renameat2`` with ``RENAME_EXCHANGE``), the two folders swap
    names in one step, so ``path`` holds the old folder or the new one at every instant, and a crash leaves at
    most the old one at ``tmp``'s name. Elsewhere the old folder is first renamed aside: a crash between the two
    renames leaves it at ``.<name>.old.<pid>``, not at ``path``.
    """
    path, tmp = Path(path), Path(tmp)
    if path.exists() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return path
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a C library without it
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # a file system that cannot
        return False
    raise OSError(code, os.strerror(code), str(b))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


class MetricsLog:
    """Append one JSON object per logged step to ``metrics.jsonl``; optionally mirror to TensorBoard / W&B.

    Each line is flushed as it is written, so a killed run keeps every line it logged.
    """

    def __init__(
        self,
        path: Path,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "pmrlhf",
        run_name: str | None = None,
        config: dict | None = None,
        resume: bool = False,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w")  # noqa: SIM115  closed in close()
        self._t0 = time.time()
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard needs: pip install tensorboard") from None

            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise RuntimeError("logging.wandb needs the wandb package: pip install wandb") from None

            self._wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time() - self._t0, 3), **_jsonable(metrics)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("step",)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return row

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """What the policy wrote at ``step`` (prompt, completion, reward per row), for a person to read: appended to
        ``samples.jsonl`` beside the metrics, and shown as a table in TensorBoard's text tab or W&B."""
        with open(self.path.with_name("samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        if self._tb is not None:
            head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
            cells = [
                "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()) + " |"
                for r in rows
            ]
            self._tb.add_text("samples", head + "\n".join(cells), step)
        if self._wandb is not None:
            import wandb as wandb_lib

            table = wandb_lib.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            self._wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
