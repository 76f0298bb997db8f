"""The ``pmrlhf`` command line: one sub-command per stage, plus the pipeline, the demo and the theory."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="RLHF that matches the spread of human preferences: KL, PM and conditional PM RLHF, and the DPO family.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """pmrlhf: SFT -> reward model -> PPO (KL, PM, conditional PM), the DPO family, and the paper's metrics."""
    if version:
        from pmrlhf import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def theory(
    out: Path = typer.Option(Path("runs/theory"), help="Folder for the figures and the table of checks."),
    seed: int = typer.Option(0, help="Seed of the random instances the closed forms are checked on."),
) -> None:
    """Draw the paper's Figs. 2 and 9 and check Thms. 1-4 and Prop. 3.7 numerically (seconds, CPU)."""
    from pmrlhf.evaluation.theory import write_theory_report

    report = write_theory_report(out, seed=seed)
    typer.echo(f"wrote {report}")
