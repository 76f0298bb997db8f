"""The SFT stage on TRL's SFTTrainer: what it trains with is what the stage's config says."""

import pytest

from pmrlhf.config import ModelConfig, OptimConfig
from pmrlhf.stages import sft


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_follows_the_model_config_not_trls_default(
    tmp_path, tiny_world_config, monkeypatch, checkpointing
):
    """TRL's SFTConfig turns activation checkpointing on by default, which made every SFT run recompute its
    activations (a sixth of the demo's SFT time) whatever ``model.gradient_checkpointing`` said."""
    from trl import SFTTrainer

    seen = []
    train = SFTTrainer.train

    def spy(self, *args, **kwargs):
        result = train(self, *args, **kwargs)  # the Trainer switches checkpointing on as training starts
        renamed = hasattr(type(self.model), "is_activation_checkpointing")  # transformers 5.24
        seen.append(getattr(self.model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing"))
        return result

    monkeypatch.setattr(SFTTrainer, "train", spy)
    config = sft.SFTConfig(
        run_dir=str(tmp_path),
        world=tiny_world_config,
        model=ModelConfig(gradient_checkpointing=checkpointing),
        optim=OptimConfig(epochs=0.05),
    )
    sft.run(config)
    assert seen == [checkpointing]
