"""Where a stage reads and writes: the run folder (each stage's partial folder, swapped in whole when it is done),
the run's world, the stage's records and the encoder that turns them into token ids."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from pmrlhf.config import DataConfig, InputError, ModelConfig, save_config
from pmrlhf.data.sources import LoadReport, load_records
from pmrlhf.data.world import FILES, WorldConfig, ensure_world, resolve_world
from pmrlhf.io import atomic_write_json, console, replace_dir
from pmrlhf.training.setup import process_state


def stage_encoder(tokenizer, data: DataConfig, model: ModelConfig, path=None, new_tokens: int = 0):
    """The stage's ``Encoder``, its prompts limited to what the model's positions hold."""
    from pmrlhf.data.tokenize import Encoder
    from pmrlhf.models import context_length

    return Encoder.from_data(tokenizer, data, context_length(model, tokenizer, path), new_tokens)


def say_encoding(stage: str, encoder) -> None:
    """One line on what encoding cut or skipped, if anything, from the main process; data the tokenizer does not
    know is refused (``Encoder.check_unknown``)."""
    encoder.check_unknown(stage)
    if encoder.summary() and process_state().is_main_process:
        console.print(f"[yellow]{stage}: {encoder.summary()}[/yellow]")


def require_examples(stage: str, kept: int, loaded: int, encoder) -> None:
    """Say what encoding cut or skipped, and refuse to train on nothing (a loop over no batches would never
    reach its step count), saying how many records were loaded and why they were dropped."""
    encoder.check_unknown(stage)
    if kept:
        say_encoding(stage, encoder)
        return
    hint = (
        "; raise data.max_prompt_tokens or set data.prompt_overflow: truncate_left"
        if encoder.counts.get("prompts skipped (too long)")
        else ""
    )
    dropped = encoder.summary() or "none dropped while encoding"
    raise InputError(f"{stage}: no examples left to train on: {loaded} records loaded ({dropped}){hint}")


def stage_dir(run_dir: str | Path, name: str, config, resumable: bool = False) -> Path:
    """The folder a stage writes into while it runs, ``<run_dir>/<name>.partial/``, with the resolved
    ``config.yaml`` written first by the main process; ``finish_stage`` swaps it into ``<run_dir>/<name>/``.

    So a stage's outputs (config, metrics, model, summary) change together or not at all: a run killed half-way,
    or refused, leaves a finished folder of an earlier run as it was. A stage that cannot resume (evaluation)
    starts from an empty partial folder; a ``resumable`` one (every training stage) keeps what a killed run left
    there, and where it has none but its finished folder has checkpoints, starts from those (linked, not copied;
    the metrics copied). Where the stage takes its data from the run's world, ``config.world`` becomes that
    world's settings (``resolve_world``).
    """
    _resolve_world(run_dir, config)
    final = Path(run_dir) / name
    path = final.with_name(f"{final.name}.partial")
    if process_state().is_main_process:
        _take_lock(final)
        if path.exists() and not resumable:
            shutil.rmtree(path)
        if resumable and not path.exists() and (final / "checkpoints").is_dir():
            path.mkdir(parents=True)
            shutil.copytree(final / "checkpoints", path / "checkpoints", copy_function=os.link)
            if (final / "metrics.jsonl").is_file():
                shutil.copy2(final / "metrics.jsonl", path / "metrics.jsonl")
        path.mkdir(parents=True, exist_ok=True)
        save_config(config, path / "config.yaml")
    return path


def finish_stage(out: Path) -> Path:
    """Swap a stage's finished partial folder (``stage_dir``) into place, on the main process, once everything
    is written; return the final folder (on every process)."""
    final = out.with_name(out.name.removesuffix(".partial"))
    if process_state().is_main_process:
        replace_dir(out, final)
        _lock_path(final).unlink(missing_ok=True)
    return final


def _lock_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.lock")


def _take_lock(final: Path) -> None:
    """Hold ``<name>.lock`` beside the stage's folder while the stage runs (the main process's pid and host), so
    that a second process on the same stage is refused: two of them wrote one partial folder, and one's result
    was lost without a word. A lock whose process no longer runs (killed), or this process's own (a stage run
    again after a failure), is taken over; ``finish_stage`` removes it."""
    import socket

    lock, me = _lock_path(final), (os.getpid(), socket.gethostname())
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = lock.with_name(f".{lock.name}.{me[0]}")
    mine.write_text(f"{me[0]} {me[1]}\n")
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)  # appears whole, or not at all
                return
            except FileExistsError:
                pid, host = _lock_owner(lock)
                if pid is not None and (pid, host) != me and (host != me[1] or _running(pid)):
                    raise InputError(
                        f"{final} is being written by another process (pid {pid} on {host}): wait for it to finish "
                        f"or stop it; if it is gone, remove {lock}"
                    ) from None
                lock.unlink(missing_ok=True)
        raise InputError(f"could not take {lock}: another process keeps taking it")
    finally:
        mine.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> tuple[int | None, str]:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):  # removed meanwhile, or not a lock this writes
        return None, ""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_objective(out: Path, objective: dict) -> Path:
    """``objective.json``: what a training stage optimised (method, loss or penalty, coefficient, alpha, scaling,
    clipping), which ``pmrlhf eval`` reads to find the run's own optimum. The only thing of evaluation that a
    training stage writes."""
    return atomic_write_json(out / OBJECTIVE, objective)


OBJECTIVE = "objective.json"


def write_run_config(run_dir: str | Path, config) -> Path:
    """The pipeline's resolved ``config.yaml`` at the top of the run folder, from the main process alone."""
    _resolve_world(run_dir, config)
    path = Path(run_dir) / "config.yaml"
    if process_state().is_main_process:
        save_config(config, path)
    return path


def _resolve_world(run_dir: str | Path, config) -> None:
    data = getattr(config, "data", None)
    if isinstance(getattr(config, "world", None), WorldConfig) and getattr(data, "source", None) == "world":
        config.world = resolve_world(world_dir(run_dir), config.world)


def world_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "world"


def data_source(data: DataConfig, kind: str, run_dir: str | Path, world: WorldConfig) -> str:
    """The file or Hub name to read ``kind`` records from; ``"world"`` builds the run's world if needed."""
    if data.source == "world":
        return str(_ensure(world_dir(run_dir), world) / FILES[kind])
    return data.source


def _ensure(path: Path, world: WorldConfig) -> Path:
    from pmrlhf.stages.realworld import ensure_realtext_world

    return ensure_realtext_world(path, world) if world.kind == "realtext" else ensure_world(path, world)


def load_stage_records(data: DataConfig, kind: str, run_dir: str | Path, world: WorldConfig) -> tuple[list, LoadReport]:
    source = data_source(data, kind, run_dir, world)
    if data.source == "world" and data.portion != "all":
        # The world writes each stage's data to its own file; the 20/40/40 split is for one shared dataset.
        data = dataclasses.replace(data, portion="all")
    records, report = load_records(data, kind, source)
    console.print(f"[dim]{report.summary()}[/dim]")
    return records, report


def tokenizer_source(model_name_or_path: str, data: DataConfig, run_dir: str | Path, world: WorldConfig) -> str:
    """Where the tokenizer comes from: the model's own, or the world's when a tiny model trains on the world."""
    if model_name_or_path:
        return model_name_or_path
    if data.source == "world" and world.kind == "realtext":
        return world.text_model
    if data.source == "world":
        return str(ensure_world(world_dir(run_dir), world) / "tokenizer")
    sft = Path(run_dir) / "sft" / "model"
    raise InputError(
        f"no model to start from for {data.source}: set model.name_or_path (a stage after SFT starts from {sft} once "
        "`pmrlhf sft` has written it); a tiny model built from config reads only the world (data.source: world)"
    )
