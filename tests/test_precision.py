"""A half ``dtype`` on a model that trains means mixed precision: float32 master weights under autocast.

At a learning rate of 1e-6 Adam's first step moves every weight by about 1e-6. A float32 weight of size 0.02
keeps that (its spacing there is 2e-9); a bf16 weight cannot (its spacing is 1.2e-4), so a stage that trained
bf16 weights would end exactly where it started.
"""

import pytest
import torch

from helpers import model_weights
from pmrlhf.config import ModelConfig, OptimConfig
from pmrlhf.data.world import World
from pmrlhf.models import load_causal_lm, load_tokenizer, save_model
from pmrlhf.stages import dpo, ppo, reward, sft

BF16 = ModelConfig(dtype="bfloat16")
SMALL_STEP = dict(lr=1e-6, batch_size=32, max_grad_norm=0.0)


def _moved(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], name: str) -> float:
    """Share of the entries of one weight matrix that changed."""
    key = next(k for k in after if k.endswith(name))
    assert after[key].dtype == torch.float32
    return (after[key] != before[key].to(after[key].dtype)).float().mean().item()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_world_config):
    """SFT, reward model and DPO, each asked for bfloat16 and given a few steps at lr 1e-6."""
    root = tmp_path_factory.mktemp("bf16")
    World.generate(tiny_world_config).write(root / "world")
    tok = load_tokenizer(root / "world" / "tokenizer")
    torch.manual_seed(0)
    save_model(load_causal_lm(ModelConfig(), tok), tok, root / "init" / "model")
    common = dict(run_dir=str(root), world=tiny_world_config)
    sft.run(
        sft.SFTConfig(
            **common,
            model=ModelConfig(name_or_path=str(root / "init" / "model"), dtype="bfloat16"),
            optim=OptimConfig(**SMALL_STEP, epochs=0.1),
        )
    )
    reward.run(reward.RewardConfig(**common, model=BF16, optim=OptimConfig(**SMALL_STEP, epochs=0.05)))
    dpo.run(dpo.DPOConfig(**common, model=BF16, optim=OptimConfig(**SMALL_STEP, epochs=0.05)))
    return root


@pytest.mark.parametrize(
    "stage,start,weight",
    [
        ("sft", "init", "h.0.mlp.c_fc.weight"),
        ("reward", "sft", "h.0.mlp.c_fc.weight"),
        ("dpo", "sft", "h.0.mlp.c_fc.weight"),
    ],
)
def test_bf16_stages_train_float32_weights(run, stage, start, weight):
    after, before = model_weights(run / stage / "model"), model_weights(run / start / "model")
    assert _moved(after, before, weight) > 0.9


def test_ppo_takes_its_mixed_precision_from_the_policy_dtype(run, tiny_world_config):
    trainer = ppo.PPOTrainer(
        ppo.PPOConfig(run_dir=str(run), world=tiny_world_config, name="ppo-bf16", policy=BF16, reward=BF16)
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.actor.parameters())
    assert next(trainer.reference.parameters()).dtype == torch.bfloat16
    explicit = ppo.PPOTrainer(
        ppo.PPOConfig(
            run_dir=str(run), world=tiny_world_config, name="ppo-no", policy=BF16, reward=BF16, mixed_precision="no"
        )
    )
    assert explicit.accelerator.mixed_precision == "no"  # an explicit choice wins: half weights, as asked
    assert next(explicit.actor.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_said_out_loud(native, monkeypatch):
    """Emulated bf16 autocast runs 3-20x slower than float32 on a CPU without native bf16: a stage asked for bf16
    there says so, and one on a CPU with it says nothing."""
    import warnings

    from pmrlhf.training import setup

    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup.stage_accelerator(ModelConfig(dtype="bfloat16"), micro_batch_size=1, max_grad_norm=1.0)
    emulated = [w for w in caught if "emulates" in str(w.message)]
    assert len(emulated) == (0 if native else 1)


def test_native_bf16_is_read_from_the_cpu():
    """This test machine's answer agrees with its CPU flags (x86: avx512_bf16 or amx_bf16)."""
    import platform
    from pathlib import Path

    from pmrlhf.training.setup import cpu_has_native_bf16

    if platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").is_file():
        pytest.skip("the flags are read from /proc/cpuinfo on x86 Linux")
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
