"""Pinned numbers of seeded tiny runs, one test per training stage: the first logged losses of each, to 1e-4.

A change to a stage's maths (a loss, a penalty, the order of its randomness, a default) moves these numbers and
fails here, where a behavioural test would still pass. A change meant to move them updates them in the same
commit and says why. The numbers are those of float32 on a CPU on one thread (the suite's, tests/conftest.py:
the order of float sums follows the thread count); other hardware may differ in the last digits.
"""

import pytest

from helpers import copy_run, ppo_config
from pmrlhf.config import DataConfig, LoggingConfig, OptimConfig
from pmrlhf.io import read_jsonl


def check(observed: list[float], pinned: list[float]) -> None:
    """Equal to 1e-4 of each value (1e-6 absolute, for values near zero)."""
    assert observed == pytest.approx(pinned, rel=1e-4, abs=1e-6), observed


def logged(path, key: str, rows: int) -> list[float]:
    return [r[key] for r in read_jsonl(path) if key in r][:rows]


def test_sft_losses_are_pinned(trained):
    """The SFT model of the shared tiny run: the loss of its first logged steps (10, the first epoch's end at 17,
    20). Moved when SFT left TRL's Trainer for the stages' own loop (its order of examples; the loss is TRL's, as
    ``test_sft.py`` checks step by step)."""
    check(logged(trained / "sft" / "metrics.jsonl", "train/loss", 3), [1.683903, 1.580555, 0.910179])


def test_reward_losses_are_pinned(trained):
    """The reward model of the shared tiny run (pairwise loss, eq. (2.2)); it and every pin below start from the
    SFT model above, and moved with it."""
    check(logged(trained / "reward" / "metrics.jsonl", "train/loss", 3), [0.674033, 0.688113, 0.653861])


@pytest.mark.parametrize(
    "loss,pinned",
    [
        ("sigmoid", [0.693147, 0.624829, 0.592978]),
        ("cpm", [1.122498, 0.899889, 1.325574]),
    ],
)
def test_dpo_losses_are_pinned(trained, tmp_path, tiny_world_config, loss, pinned):
    from pmrlhf.stages import dpo

    run = copy_run(trained, tmp_path / "run")
    config = dpo.DPOConfig(
        run_dir=str(run),
        world=tiny_world_config,
        loss=loss,
        beta=1.0,
        alpha=0.003,
        data=DataConfig(portion="reward", limit=96),
        optim=OptimConfig(lr=3e-4, epochs=1, batch_size=16),
        logging=LoggingConfig(log_every=1),
        checkpoint_every=0,
    )
    dpo.run(config)
    check(logged(run / "dpo" / "metrics.jsonl", "train/loss", 3), pinned)


@pytest.mark.parametrize(
    "kw,pinned",
    [
        (
            {"penalty": "kl", "kl_ctl": 1.0},
            {
                "env/reward": [-0.577536, -0.645545, -0.594009],
                "objective/kl": [0.0, 0.041728, 0.007022],
                "losses/value": [0.362783, 0.277703, 0.185296],
            },
        ),
        (
            {"penalty": "cpm_token", "alpha_ctl": 0.3},
            {
                "env/reward": [-0.577536, -0.645545, -0.594009],
                "objective/penalty": [-0.271704, -0.468675, -0.408252],
                "objective/kl": [0.0, 0.045059, 0.025451],
                "losses/value": [0.298803, 0.348899, 0.173078],
            },
        ),
        (
            {"penalty": "pm", "advantage": "rloo", "samples_per_prompt": 2},
            {
                "env/reward": [-0.533926, -0.587342, -0.533926],
                "objective/penalty": [-0.521045, -0.375103, -0.502887],
                "policy/approx_kl": [1.406003e-05, 2.427194e-05, 1.271716e-05],
                "losses/policy": [-5.512163e-04, -8.187369e-04, -4.054382e-04],
                "policy/ratio": [0.998665, 1.000666, 0.998443],
            },
        ),
    ],
)
def test_ppo_metrics_are_pinned(trained, tmp_path, tiny_world_config, kw, pinned):
    """Reward, penalty and value loss of the first iterations: sampling, scoring, shaping and the update all
    feed them, as each iteration samples from the policy the previous one trained."""
    from pmrlhf.stages import ppo

    run = copy_run(trained, tmp_path / "run")
    ppo.run(ppo_config(run, tiny_world_config, iterations=3, **kw))
    rows = list(read_jsonl(run / "ppo" / "metrics.jsonl"))
    for key, values in pinned.items():
        check([r[key] for r in rows], values)
