"""``pmrlhf eval`` and ``pmrlhf probe``: Sec. 6.1 metrics for trained policies, and the collapse probe.

Both read models from the run folder (or any paths) and write JSON a report or a person reads; neither
trains. In the synthetic world, eval adds the exact metrics over M(x) (``evaluation.exact``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, InputError, ModelConfig, Seed, read_json, require
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.evaluation import realtext
from pmrlhf.evaluation.exact import compare_with_closed_forms, policy_over_m, reward_beta, rewards_over_m
from pmrlhf.evaluation.metrics import sample_pairs, sec61_metrics, texts_of
from pmrlhf.evaluation.probe import probe
from pmrlhf.evaluation.truth import reward_model_gap, truth_over_m
from pmrlhf.io import atomic_write_json, console
from pmrlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from pmrlhf.stages.realworld import load_truth
from pmrlhf.stages.run_folder import (
    OBJECTIVE,
    finish_stage,
    load_stage_records,
    say_encoding,
    stage_dir,
    stage_encoder,
    world_dir,
)
from pmrlhf.training.setup import on_the_main_process, process_device, seed_everything


@dataclass
class EvalConfig:
    """``pmrlhf eval``: every policy against its reference and the reward model."""

    run_dir: str = "runs/demo"  # the run folder
    name: str = "eval"  # sub-folder of the outputs
    seed: Seed = 0  # seed of the sampled pairs (the same for every model)
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=DataConfig)  # the prompts
    # name -> model path; {}: every policy a PPO or DPO stage wrote in <run_dir> (its objective.json says so)
    policies: dict[str, str] = field(default_factory=dict)
    reference: str = ""  # "" = <run_dir>/sft/model
    reward: str = ""  # "" = <run_dir>/reward/model
    beta: float = 1.0  # p_reward uses r / beta, unless the stage that trained a policy records its own
    pairs_per_prompt: int = 4  # sampled (y1, y2) pairs per prompt
    max_new_tokens: int = 16  # generation limit
    top_p: float = 1.0  # sampling of the evaluated pairs: the policy itself, untruncated
    batch_size: int = 64  # sequences per forward pass
    # world: reference samples per prompt that estimate the KL and conditional PM optima's mass outside M(x); 0: none
    optimum_samples: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)  # dtype and loading options for every model

    def validate(self) -> None:
        _check_sampling(self)
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.optimum_samples >= 0, f"optimum_samples must be >= 0, got {self.optimum_samples}")


@dataclass
class ProbeConfig:
    """``pmrlhf probe``: the paper's Figs. 3-4 for a reference model and a reward model."""

    run_dir: str = "runs/demo"  # the run folder
    name: str = "probe"  # sub-folder of the outputs
    seed: Seed = 0  # seed of the sampled pairs
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=DataConfig)  # the prompts
    reference: str = ""  # "" = <run_dir>/sft/model
    reward: str = ""  # "" = <run_dir>/reward/model
    beta: float = 1.0  # p_reward uses r / beta
    pairs_per_prompt: int = 8  # sampled pairs per prompt
    max_new_tokens: int = 16  # generation limit
    batch_size: int = 64  # sequences per forward pass
    model: ModelConfig = field(default_factory=ModelConfig)  # dtype and loading options

    def validate(self) -> None:
        _check_sampling(self)


def _check_sampling(config) -> None:
    for name in ("pairs_per_prompt", "max_new_tokens", "batch_size"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.beta > 0, f"beta must be > 0, got {config.beta}")


def _prompts(config, tokenizer) -> list[list[int]]:
    records, _ = load_stage_records(config.data, "prompt", config.run_dir, config.world)
    encoder = stage_encoder(tokenizer, config.data, config.model, _paths(config)[0], config.max_new_tokens)
    ids = encoder.prompts(r.prompt for r in records)
    say_encoding(config.name, encoder)
    return [p for p in ids for _ in range(config.pairs_per_prompt)]


def _paths(config) -> tuple[Path, Path]:
    run = Path(config.run_dir)
    return Path(config.reference or run / "sft" / "model"), Path(config.reward or run / "reward" / "model")


_RETRAIN = "train that stage again (or remove its folder)"


def discover_policies(run_dir: str | Path) -> dict[str, str]:
    """Every ``<run_dir>/<stage>/model`` written by a policy-optimisation stage (its ``objective.json`` says so)."""
    found = {}
    for path in sorted(Path(run_dir).glob(f"*/{OBJECTIVE}")):
        if path.parent.name.endswith(".partial"):  # a run that did not finish
            continue
        if (path.parent / "model").is_dir() and read_json(path, _RETRAIN)["method"] in ("ppo", "dpo"):
            found[path.parent.name] = str(path.parent / "model")
    return found


def policy_objective(path: str | Path, beta: float) -> dict:
    """What the stage that wrote the policy at ``path`` optimised (its ``objective.json``). A model that no
    policy-optimisation stage trained (the reference, or a path given in ``policies``) is placed against KL RLHF
    at coefficient 1 on the unclipped reward ``r / beta``: its distance to that optimum is how far such training
    would have to move it."""
    written = Path(path).parent / OBJECTIVE
    objective = read_json(written, _RETRAIN) if written.is_file() else {}
    if objective.get("method") in ("ppo", "dpo"):
        return objective
    return {"method": "ppo", "penalty": "kl", "coef": 1.0, "beta": beta, "clip_reward_value": None}


def _frozen_models(model: ModelConfig, tokenizer, ref_path, reward_path):
    """The reference and the reward model, frozen, on this process's device."""
    device = process_device()
    return (
        load_causal_lm(model, tokenizer, ref_path, trainable=False).to(device),
        load_reward_model(model, tokenizer, reward_path, trainable=False).to(device),
    )


@on_the_main_process
def run_eval(config: EvalConfig) -> Path:
    """Write ``<name>/summary.json`` (one object per policy) and ``<name>/instances.json``; return the folder."""
    out = stage_dir(config.run_dir, config.name, config)
    ref_path, reward_path = _paths(config)
    tokenizer = load_tokenizer(ref_path)
    reference, reward_model = _frozen_models(config.model, tokenizer, ref_path, reward_path)
    prompts = _prompts(config, tokenizer)
    policies = config.policies or discover_policies(config.run_dir)
    if not policies:
        raise InputError(f"no policies to evaluate: none found in {config.run_dir} and none given in policies")
    summary, instances, over_m, texts, sampled = {}, {}, {}, {}, {}
    real_text = config.data.source == "world" and config.world.kind == "realtext"
    real = load_truth(world_dir(config.run_dir)) if real_text else None
    for name, path in {"reference (SFT)": str(ref_path), **policies}.items():
        objective = policy_objective(path, config.beta)
        beta = reward_beta(objective)
        seed_everything(config.seed)  # the same randomness for every model
        policy = (
            reference
            if name == "reference (SFT)"
            else load_causal_lm(config.model, tokenizer, path, trainable=False).to(process_device())
        )
        with console.status(f"evaluating {name}"):
            samples = sample_pairs(
                policy,
                reference,
                reward_model,
                tokenizer,
                prompts,
                config.max_new_tokens,
                config.top_p,
                1.0,
                config.batch_size,
            )
            metrics, inst = sec61_metrics(samples, beta)
            metrics |= {"beta": beta, "path": path, "objective": objective}
            texts[name] = texts_of(samples, tokenizer)
            sampled[name] = _sampled_rows(prompts, texts[name], samples, tokenizer)
            if real is not None:
                metrics |= realtext.truth_metrics(samples, texts[name], real)
                metrics |= realtext.win_rates(texts[name], texts["reference (SFT)"], real)
            elif config.data.source == "world":
                dist = policy_over_m(policy, tokenizer, World.load(world_dir(config.run_dir)))
                metrics["world"] = compare_with_closed_forms(
                    policy,
                    reference,
                    reward_model,
                    tokenizer,
                    world_dir(config.run_dir),
                    objective,
                    dist,
                    max_new_tokens=config.max_new_tokens if config.optimum_samples else 0,
                    reference_samples=config.optimum_samples,
                )
                over_m[name] = dist.conditional.tolist()
        summary[name], instances[name] = metrics, inst
        truth = f" (truth {metrics['pm_divergence_truth']:.3f})" if real is not None else ""
        console.print(
            f"{name:<20} PM div. {metrics['pm_divergence']:.3f}{truth}  len {metrics['length']:.1f}  "
            f"ppl {metrics['perplexity']:.1f}  KL {metrics['kl']:.3f}"
            + (f"  minority's share {metrics['minority_share']:.2f}" if real is not None else "")
        )
    if over_m:
        world = World.load(world_dir(config.run_dir))
        scores, mask = rewards_over_m(reward_model, tokenizer, world)
        gap = reward_model_gap(scores, mask, world)
        atomic_write_json(out / "reward_model.json", gap)
        console.print(
            f"reward model: mean |p_theta - p| over pairs of M(x) {gap['pair_gap_to_truth']:.3f} from the labels', "
            f"{gap['pair_gap_to_learnable']:.3f} from their BTL fit"
        )
        over_m["reward model"] = torch.softmax((scores / config.beta).masked_fill(~mask, float("-inf")), -1).tolist()
        truth = truth_over_m(world)
        over_m["ground truth"] = truth["truth"].tolist()
        over_m["learnable target"] = truth["learnable"].tolist()
        atomic_write_json(out / "over_m.json", over_m)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "instances.json", instances)
    atomic_write_json(out / "samples.json", sampled)
    return finish_stage(out)


def _sampled_rows(prompts: list[list[int]], pairs: list[tuple[str, str]], samples, tokenizer) -> list[dict]:
    """What a person reads of a policy: each prompt, its two sampled answers and the reward model's scores."""
    return [
        {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True).strip(),
            "completions": list(pair),
            "rewards": [samples.reward[0][i].item(), samples.reward[1][i].item()],
        }
        for i, (prompt, pair) in enumerate(zip(prompts, pairs, strict=True))
    ]


@on_the_main_process
def run_probe(config: ProbeConfig) -> Path:
    """Write ``<name>/summary.json`` and ``<name>/pairs.json``; return the folder."""
    out = stage_dir(config.run_dir, config.name, config)
    seed_everything(config.seed)
    ref_path, reward_path = _paths(config)
    tokenizer = load_tokenizer(ref_path)
    reference, reward_model = _frozen_models(config.model, tokenizer, ref_path, reward_path)
    with console.status("sampling pairs from the reference"):
        samples = sample_pairs(
            reference,
            reference,
            reward_model,
            tokenizer,
            _prompts(config, tokenizer),
            config.max_new_tokens,
            1.0,
            1.0,
            config.batch_size,
        )
    summary, pairs = probe(samples, config.beta)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "pairs.json", pairs)
    console.print(
        f"collapse rate (p_ref <= 0.01 or >= 0.99): {summary['collapse_rate']:.3f} of {summary['pairs']} pairs;"
        f" reward model: {summary['reward_collapse_rate']:.3f}"
    )
    return finish_stage(out)
