"""``pmrlhf run CONFIG.yaml`` and ``pmrlhf demo``: every stage from one config, reusing finished ones.

SFT -> reward model -> one PPO run per variant -> one DPO run per DPO variant -> eval -> probe -> report.
The shared settings (run folder, seed, world, data source, models) are written once and handed to each
stage; a stage whose outputs are already in the run folder is skipped unless ``force`` is set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmrlhf.config import (
    ConfigError,
    DataConfig,
    InputError,
    ModelConfig,
    Seed,
    from_dict,
    merge_sections,
    read_yaml,
    require,
    to_dict,
)
from pmrlhf.data.world import WorldConfig
from pmrlhf.evaluation.report import write_report
from pmrlhf.io import atomic_write_json, console
from pmrlhf.stages import dpo, evaluate, ppo, reward, sft
from pmrlhf.stages.run_folder import write_run_config
from pmrlhf.training import checkpoints
from pmrlhf.training.setup import check_launch, on_the_main_process


def default_variants() -> list[dict[str, Any]]:
    """The demo's methods: KL RLHF at the paper's beta grid, PM RLHF, and conditional PM RLHF at its alpha grid
    (per-token rule of the reference code), plus Def. 4.1's sequence rule with alpha below every meaningful
    answer's reference probability."""
    return [
        {"name": "ppo-kl", "penalty": "kl", "kl_ctl": 1.0},
        {"name": "ppo-kl-beta0.5", "penalty": "kl", "kl_ctl": 1.0, "beta": 0.5},
        {"name": "ppo-kl-beta0.1", "penalty": "kl", "kl_ctl": 1.0, "beta": 0.1},
        {"name": "ppo-pm", "penalty": "pm", "ent_ctl": 1.0},
        {"name": "ppo-cpm-0.1", "penalty": "cpm_token", "alpha_ctl": 0.1},
        {"name": "ppo-cpm-0.3", "penalty": "cpm_token", "alpha_ctl": 0.3},
        {"name": "ppo-cpm-0.5", "penalty": "cpm_token", "alpha_ctl": 0.5},
        {"name": "ppo-cpm-seq", "penalty": "cpm_sequence", "alpha_ctl": 0.003},
    ]


def default_dpo_variants() -> list[dict[str, Any]]:
    """The DPO family on the same comparisons: DPO, and its preference-matching counterparts."""
    return [
        {"name": "dpo", "loss": "sigmoid", "beta": 1.0},
        {"name": "dpo-pm", "loss": "pm", "beta": 1.0},
        {"name": "dpo-cpm", "loss": "cpm", "beta": 1.0, "alpha": 0.003},
    ]


@dataclass
class PipelineConfig:
    """The whole pipeline. Stage sections hold overrides of that stage's config (``pmrlhf <stage> --help``)."""

    run_dir: str = "runs/demo"  # the run folder every stage shares
    seed: Seed = 0  # seed handed to every stage
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic world (when data.source is "world")
    data: DataConfig = field(default_factory=DataConfig)  # the one dataset every stage takes its portion of
    policy: ModelConfig = field(default_factory=ModelConfig)  # the SFT model, actor and reference
    reward_model: ModelConfig = field(default_factory=ModelConfig)  # the reward model and critic
    sft: dict[str, Any] = field(default_factory=dict)  # overrides of the SFT stage's config
    reward: dict[str, Any] = field(default_factory=dict)  # overrides of the reward stage's config
    # overrides of every PPO variant's config
    ppo: dict[str, Any] = field(default_factory=lambda: {"iterations": 600, "optim": {"lr": 3e-4}, "top_p": 1.0})
    variants: list[dict[str, Any]] = field(default_factory=default_variants)  # one PPO run each; "name" required
    dpo: dict[str, Any] = field(  # base DPO overrides
        default_factory=lambda: {"optim": {"lr": 3e-4, "epochs": 3, "batch_size": 16}}
    )
    dpo_variants: list[dict[str, Any]] = field(default_factory=default_dpo_variants)  # one DPO run each
    eval: dict[str, Any] = field(default_factory=dict)  # overrides of the eval config
    probe: dict[str, Any] = field(default_factory=dict)  # overrides of the probe config
    force: bool = False  # rerun stages whose outputs already exist
    resume: bool = False  # continue an unfinished stage from its newest checkpoint instead of starting it afresh

    def stage_configs(self) -> dict[str, Any]:
        """Every stage's full config, validated, keyed by stage name (the variants by their names); a setting
        that cannot work is refused with the stage's name before anything runs."""
        shared = {"run_dir": self.run_dir, "seed": self.seed, "world": to_dict(self.world)}

        def data(portion: str, extra: dict) -> dict:
            return {**to_dict(self.data), "portion": portion, **extra.get("data", {})}

        def build(name: str, cls: type, settings: dict, adjust=lambda cfg: cfg) -> None:
            try:
                cfg = adjust(from_dict(cls, settings))
                if hasattr(cfg, "validate"):
                    cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            configs[name] = cfg

        configs: dict[str, Any] = {}
        build(
            "sft", sft.SFTConfig, {**shared, "model": to_dict(self.policy), **self.sft, "data": data("sft", self.sft)}
        )
        build(
            "reward",
            reward.RewardConfig,
            {**shared, "model": to_dict(self.reward_model), **self.reward, "data": data("reward", self.reward)},
        )
        names = [v.get("name") for v in [*self.variants, *self.dpo_variants]]
        require(all(names) and len(set(names)) == len(names), f"every variant needs a distinct name, got {names}")

        def own_models(cfg):  # the actor starts from this run's SFT model, the critic from its reward model
            if cfg.policy.name_or_path == self.policy.name_or_path:
                cfg.policy = dataclasses.replace(cfg.policy, name_or_path="")
            if cfg.reward.name_or_path == self.reward_model.name_or_path:
                cfg.reward = dataclasses.replace(cfg.reward, name_or_path="")
            return cfg

        for variant in self.variants:
            # a variant's sections (penalty, optim, ...) change only the keys they name in the base's
            ppo_settings = merge_sections(ppo.penalty_section(self.ppo), ppo.penalty_section(variant))
            merged = {**shared, "policy": to_dict(self.policy), "reward": to_dict(self.reward_model), **ppo_settings}
            build(variant["name"], ppo.PPOConfig, {**merged, "data": data("rl", ppo_settings)}, own_models)
        for variant in self.dpo_variants:
            merged = {
                **shared,
                "model": {**to_dict(self.policy), "name_or_path": ""},
                **self.dpo,
                **variant,
                "data": data("reward", {"data": {**self.dpo.get("data", {}), **variant.get("data", {})}}),
            }
            build(variant["name"], dpo.DPOConfig, merged)
        model = {"model": {**to_dict(self.policy), "name_or_path": ""}}
        build("eval", evaluate.EvalConfig, {**shared, **model, **self.eval, "data": data("rl", self.eval)})
        build("probe", evaluate.ProbeConfig, {**shared, **model, **self.probe, "data": data("rl", self.probe)})
        return configs


def _done(run_dir: Path, name: str) -> bool:
    return (run_dir / name / "summary.json").is_file()


def _check_reusable(run_dir: Path, name: str, config) -> None:
    """Refuse to reuse a finished stage that recorded other settings than those asked for now (a sweep's changed
    coefficient was reported as the old run's): all must match but those a resumed run may change and the world,
    which every stage that reads it checks against the run's; a setting added since, asked at its default, matches."""
    recorded = run_dir / name / "config.yaml"
    if not recorded.is_file():
        return
    may_change = (*checkpoints.MAY_CHANGE, "world")
    differ = checkpoints.differences(read_yaml(recorded) or {}, to_dict(config), may_change, to_dict(type(config)()))
    if differ:
        raise InputError(
            f"{name}: {run_dir / name} was trained with other settings ({'; '.join(differ)}): set force: true (or "
            "remove that folder) to train it again with these, or use another run folder"
        )


def run(config: PipelineConfig, finished: Callable[[str], None] | None = None) -> Path:
    """Run every stage that is not finished yet; return the report's path. ``finished(name)`` is called as each
    training stage is done or found done (a sweep's progress)."""
    check_launch()  # before the first stage, not hours later at the stage that would go wrong
    configs = config.stage_configs()
    run_dir = Path(config.run_dir)
    for name in configs:
        if name not in ("eval", "probe") and _done(run_dir, name) and not config.force:
            _check_reusable(run_dir, name, configs[name])  # before anything is written
    write_run_config(run_dir, config)
    timings: dict[str, float] = {}
    variants = [v["name"] for v in config.variants]
    dpo_variants = [v["name"] for v in config.dpo_variants]
    steps = [
        ("sft", sft.run),
        ("reward", reward.run),
        *((n, ppo.run) for n in variants),
        *((n, dpo.run) for n in dpo_variants),
    ]
    for name, stage_run in steps:
        if _done(run_dir, name) and not config.force:
            console.print(f"[dim]{name}: already done, reusing {run_dir / name}[/dim]")
        else:
            console.rule(name)
            t = time.perf_counter()
            configs[name].resume = config.resume  # every training stage can resume
            stage_run(configs[name])
            timings[name] = time.perf_counter() - t
        if finished is not None:
            finished(name)
    eval_cfg = configs["eval"]
    if not eval_cfg.policies:
        eval_cfg.policies = {n: str(run_dir / n / "model") for n in [*variants, *dpo_variants]}
    for name, stage_run in (("eval", evaluate.run_eval), ("probe", evaluate.run_probe)):
        console.rule(name)
        t = time.perf_counter()
        configs[name].resume = config.resume  # every training stage can resume
        stage_run(configs[name])
        timings[name] = time.perf_counter() - t
    report = _write_report(run_dir, timings, configs["eval"].name, configs["probe"].name)
    return report or run_dir / "report" / "report.md"  # where the main process wrote it


@on_the_main_process
def _write_report(run_dir: Path, timings: dict[str, float], eval_name: str, probe_name: str) -> Path:
    atomic_write_json(run_dir / "timings.json", timings)
    console.rule("report")
    return write_report(run_dir, eval_name, probe_name)


def demo_config(quick: bool = False, run_dir: str | None = None) -> PipelineConfig:
    """The embedded default: the synthetic world end to end; ``quick`` is a smaller world for tests."""
    if not quick:
        return PipelineConfig(run_dir=run_dir or "runs/demo")
    return PipelineConfig(
        run_dir=run_dir or "runs/demo-quick",
        world=WorldConfig(
            n_prompts=6,
            responses_per_prompt=3,
            max_words=4,
            vocab_words=12,
            n_demonstrations=900,
            n_comparisons=1200,
            n_rankings=100,
            ranking_k=3,
        ),
        ppo={
            "iterations": 250,
            "optim": {"lr": 3e-4, "batch_size": 6},
            "top_p": 1.0,
            "prompts_per_iteration": 6,
            "max_new_tokens": 8,
            "data": {"max_response_tokens": 8},
        },
        variants=[
            {"name": "ppo-kl", "penalty": "kl", "kl_ctl": 1.0},
            {"name": "ppo-pm", "penalty": "pm", "ent_ctl": 1.0},
            {"name": "ppo-cpm-0.3", "penalty": "cpm_token", "alpha_ctl": 0.3},
            {"name": "ppo-cpm-seq", "penalty": "cpm_sequence", "alpha_ctl": 0.001},
        ],
        dpo_variants=[
            {"name": "dpo", "loss": "sigmoid", "beta": 1.0},
            {"name": "dpo-pm", "loss": "pm", "beta": 1.0},
        ],
        eval={"max_new_tokens": 8, "pairs_per_prompt": 8},
        probe={"max_new_tokens": 8},
    )
