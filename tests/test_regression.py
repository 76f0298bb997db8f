"""Pinned numbers of seeded tiny runs, one test per training stage: the first logged losses of each, to 1e-4.

A change to a stage's maths (a loss, a penalty, the order of its randomness, a default) moves these numbers and
fails here, where a behavioural test would still pass. A change meant to move them updates them in the same
commit and says why. The numbers are those of float32 on a CPU; other hardware may differ in the last digits.
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
    """The SFT model of the shared tiny run: the mean loss of each of its first logged windows of 10 steps."""
    check(logged(trained / "sft" / "metrics.jsonl", "loss", 3), [2.096708, 1.236712, 0.855383])


def test_reward_losses_are_pinned(trained):
    """The reward model of the shared tiny run (pairwise loss, eq. (2.2))."""
    check(logged(trained / "reward" / "metrics.jsonl", "train/loss", 3), [0.693802, 0.714623, 0.661164])


@pytest.mark.parametrize(
    "loss,pinned",
    [
        ("sigmoid", [0.693147, 0.648937, 0.632780]),
        ("cpm", [1.072953, 0.861883, 1.814786]),
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
                "env/reward": [-0.494035, -0.520689, -0.409424],
                "objective/kl": [-7.8076e-08, -0.022419, 0.0028528],
                "losses/value": [0.338673, 0.259635, 0.139309],
            },
        ),
        (
            {"penalty": "cpm_token", "alpha_ctl": 0.3},
            {
                "env/reward": [-0.494035, -0.520689, -0.409424],
                "objective/penalty": [-0.241677, -0.257585, -0.243502],
                "objective/kl": [-7.8076e-08, -0.030078, 0.013168],
                "losses/value": [0.264503, 0.185838, 0.119793],
            },
        ),
        (
            {"penalty": "pm", "advantage": "rloo", "samples_per_prompt": 2},
            {
                "env/reward": [-0.423246, -0.350656, -0.434594],
                "objective/penalty": [-0.344160, -1.813965, -0.279761],
                "policy/approx_kl": [2.337796e-06, 4.451135e-05, 2.280560e-05],
                "losses/policy": [-2.463795e-04, 1.189410e-03, -8.861497e-04],
                "policy/ratio": [1.000114, 1.000304, 1.000960],
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
