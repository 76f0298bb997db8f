"""Learning-rate schedules and gradient accumulation of the reward and DPO stages: the logged learning rate of
every optimiser step equals the schedule's closed form, and grad_accum micro-batches make one step."""

import json
import math

import pytest
import torch

from pmrlhf.config import DataConfig, LoggingConfig, OptimConfig
from pmrlhf.io import read_jsonl
from pmrlhf.stages import dpo, reward
from pmrlhf.training.optim import batches_per_pass, lr_schedule


def closed_form(scheduler: str, k: int, steps: int, warmup: int) -> float:
    """The factor of the peak learning rate used by optimiser step ``k`` (from 0)."""
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / (steps - warmup)
    return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[scheduler]


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_schedules_follow_their_closed_forms_after_a_linear_warm_up(scheduler):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    schedule = lr_schedule(optimizer, OptimConfig(lr=0.5, scheduler=scheduler, warmup_ratio=0.2), 20)
    lrs = []
    for _ in range(20):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.5 * closed_form(scheduler, k, 20, 4) for k in range(20)], abs=1e-12)
    with pytest.raises(ValueError, match="scheduler must be one of constant, linear, cosine, got 'step'"):
        OptimConfig(scheduler="step")


def _steps(run, name):
    return [r for r in read_jsonl(run / name / "metrics.jsonl") if "train/lr" in r]


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step()` before `optimizer.step()`")
def test_reward_and_dpo_stages_follow_their_schedule_one_step_per_window(tmp_path, tiny_world_config):
    """No SFT model in the run folder: both stages start from a tiny model built from config."""
    data = DataConfig(portion="reward", limit=160)
    optim = dict(epochs=1, batch_size=8, grad_accum=3, warmup_ratio=0.25, lr=1e-3)
    common = dict(run_dir=str(tmp_path), world=tiny_world_config, data=data, logging=LoggingConfig(log_every=1))
    reward.run(reward.RewardConfig(**common, optim=OptimConfig(**optim, scheduler="linear"), eval_every=1000))
    dpo.run(dpo.DPOConfig(**common, optim=OptimConfig(**optim, scheduler="cosine")))
    for name, scheduler in (("reward", "linear"), ("dpo", "cosine")):
        rows = _steps(tmp_path, name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        steps = summary["steps"]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        warmup = math.ceil(0.25 * steps)
        expected = [1e-3 * closed_form(scheduler, k, steps, warmup) for k in range(steps)]
        assert [r["train/lr"] for r in rows] == pytest.approx(expected, abs=1e-12), name
    train = json.loads((tmp_path / "reward" / "summary.json").read_text())["train_examples"]
    assert len(_steps(tmp_path, "reward")) == batches_per_pass(train, 8) // 3 >= 4  # three micro-batches a step
