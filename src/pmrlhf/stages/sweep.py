"""``pmrlhf sweep CONFIG.yaml``: methods x an alpha or beta grid x seeds on one world, written as one study.

Each seed is one pipeline run in ``<sweep_dir>/seed<S>``: its SFT and reward models are trained once and every
method of the grid starts from them. Finished stages are reused, so a sweep that stopped continues where it
stopped (``resume`` also continues an unfinished stage from its newest checkpoint). The study
(``evaluation.study``) goes to ``<sweep_dir>/study``: ``study.md`` with the table and the figures, ``study.json``
with every seed's value.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmrlhf.config import Seed, from_dict, merge_sections, require, to_dict
from pmrlhf.data.world import World
from pmrlhf.evaluation import study
from pmrlhf.io import atomic_write_json, atomic_write_text, console, progress_bar
from pmrlhf.stages import pipeline
from pmrlhf.stages.run_folder import world_dir
from pmrlhf.training.setup import on_the_main_process


@dataclass
class SweepConfig:
    """``pmrlhf sweep``: every method of ``grid`` on every seed, from the pipeline settings in ``pipeline``."""

    sweep_dir: str = "runs/study"  # the study's folder: one run folder per seed (seed<S>/) and study/
    seeds: list[Seed] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # training seeds; one world for all
    pipeline: dict[str, Any] = field(default_factory=dict)  # pipeline settings every seed shares (pmrlhf run --help)
    # methods: a PPO variant (penalty, ...) or a DPO variant (loss, ...) with a name; a list value sweeps that key
    grid: list[dict[str, Any]] = field(default_factory=list)
    # train and tabulate only these methods: a grid entry's name (all its values) or one swept name; empty: all
    only: list[str] = field(default_factory=list)
    quick: dict[str, Any] = field(default_factory=dict)  # what --quick changes (seeds, pipeline, grid), for a test
    resume: bool = False  # continue an unfinished stage from its newest checkpoint instead of starting it afresh

    def validate(self) -> None:
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds must be distinct, >= 1")
        require(bool(self.grid), "grid is empty: name at least one method")
        for entry in self.grid:
            swept = [k for k, v in entry.items() if isinstance(v, list)]
            require(bool(entry.get("name")), f"every grid entry needs a name, got {entry}")
            require(len(swept) <= 1, f"{entry['name']}: one setting per entry may be a list, got {swept}")
        names = [v["name"] for _, v in self._expanded()]
        require(len(set(names)) == len(names), f"the grid names a method twice: {names}")
        known = {e["name"] for e in self.grid} | set(names)
        unknown = [n for n in self.only if n not in known]
        require(not unknown, f"only names no method of the grid: {unknown}; the grid's: {sorted(known)}")
        for key in ("variants", "dpo_variants", "run_dir", "seed"):
            require(key not in self.pipeline, f"pipeline.{key} is set by the sweep (grid, sweep_dir, seeds)")

    def quick_form(self) -> SweepConfig:
        """This sweep with ``quick``'s settings written over it."""
        return from_dict(SweepConfig, merge_sections({**to_dict(self), "quick": {}}, self.quick))

    def variants(self) -> list[dict[str, Any]]:
        """The methods to run: the grid's, one per value of a swept setting (named ``<name>-<value>``), or those
        ``only`` names."""
        return [v for entry, v in self._expanded() if not self.only or {entry, v["name"]} & set(self.only)]

    def _expanded(self) -> list[tuple[str, dict[str, Any]]]:
        """Every method of the grid, with the name of the grid entry it comes from."""
        out = []
        for entry in self.grid:
            swept = [k for k, v in entry.items() if isinstance(v, list)]
            values = (
                [dict(entry)]
                if not swept
                else [{**entry, swept[0]: v, "name": f"{entry['name']}-{_label(v)}"} for v in entry[swept[0]]]
            )
            out += [(entry["name"], v) for v in values]
        return out

    def seed_config(self, seed: int) -> pipeline.PipelineConfig:
        """The pipeline run of one seed."""
        variants = self.variants()
        own = {
            "run_dir": str(Path(self.sweep_dir) / f"seed{seed}"),
            "seed": seed,
            "resume": self.resume,
            "variants": [v for v in variants if "loss" not in v],
            "dpo_variants": [v for v in variants if "loss" in v],
        }
        return from_dict(pipeline.PipelineConfig, {**self.pipeline, **own})


def _label(value: Any) -> str:
    """A swept value as a method's name ends: numbers short (``0.01``, ``1e-05``), anything else as it is."""
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def run(config: SweepConfig) -> Path:
    """Train and evaluate every seed not finished yet, then write the study; return ``study.md``'s path."""
    config.validate()
    seeds = {s: config.seed_config(s) for s in config.seeds}
    for cfg in seeds.values():
        cfg.stage_configs()  # every seed's every stage is valid before the first one trains
    stages_per_seed = 2 + len(config.variants())
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=len(seeds) * stages_per_seed)
        for seed, cfg in seeds.items():
            bar.update(task, description=f"sweep: seed {seed}")
            pipeline.run(cfg, finished=lambda _: bar.advance(task))
    write_study(Path(config.sweep_dir), config.seeds)
    out = Path(config.sweep_dir) / "study" / "study.md"
    console.print(f"sweep of {len(seeds)} seeds done in {time.perf_counter() - start:.0f} s: {out}")
    return out


@on_the_main_process
def write_study(sweep_dir: Path, seeds: list[int]) -> Path:
    """``study/study.md``, ``study.json`` and the figures from the seeds' evaluations."""
    world = World.load(world_dir(sweep_dir / f"seed{seeds[0]}"))
    per_seed = {s: study.seed_metrics(sweep_dir / f"seed{s}", world) for s in seeds}
    real = world.config.kind == "realtext"
    result = study.aggregate(per_seed, real)
    out = sweep_dir / "study"
    if real:
        figures = [study.plot_real(result, out / "realtext.png")]
    else:
        share = {
            n: result["methods"][n]["intervals"]["minority_share"].mean
            for n in ("ground truth", "learnable target")
            if n in result["methods"]
        }
        figures = [
            study.plot_alpha(result, out / "pm_divergence_vs_alpha.png"),
            study.plot_tradeoff(result, out / "tradeoff.png"),
            study.plot_minority(result, share["ground truth"], out / "minority.png", share.get("learnable target")),
        ]
    atomic_write_json(out / "study.json", json.loads(json.dumps(result, default=lambda i: i.__dict__)))
    return atomic_write_text(out / "study.md", _markdown(result, world, seeds, figures))


def _markdown(result: dict, world: World, seeds: list[int], figures: list[Path]) -> str:
    methods = result["methods"]
    lines = [
        "# Study",
        "",
        f"World: {world.config.kind}, {world.config.n_prompts} prompts, seed {world.config.seed}. Training seeds: "
        f"{seeds}. Every cell is the mean over the seeds ± the half-width of its 95 % t-interval; Δ columns are "
        "paired by seed against the family's baseline (KL-penalised PPO at coefficient 1, DPO at beta 1), * where "
        "that interval excludes 0."
        + (
            ""
            if world.config.kind == "realtext"
            else " The exact PM divergence is over every pair of M(x), teacher-forced; the sampled one is the "
            "paper's (Sec. 6.1), over pairs the policy sampled."
        ),
        "",
        study.table(result),
        "",
    ]
    if world.config.kind != "realtext":  # the target is one of the synthetic worlds' exact metrics
        met = [n for n, r in methods.items() if "baseline" in r and study.meets_target(r, methods[r["baseline"]])]
        met = [n for n in met if n != study.REFERENCE]
        lines += [
            "## Against the target",
            "",
            "Mass outside M(x) at most 0.10 and exact PM divergence at most half the baseline's, both in the mean: "
            + (", ".join(met) if met else "no method")
            + ".",
            "",
        ]
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"
