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


def test_sft_trains_on_the_token_ids_every_later_stage_uses_even_where_tokens_merge_across_the_boundary():
    """Tokenised as one text, prompt "xa" + response "b" is [x, ab]: the response's first token would swallow the
    prompt's last. SFT takes the ids the encoder gives every stage, so its response mask is the one PPO and DPO
    compute (``scoring.join``), on the same tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pmrlhf.data.records import Demonstration
    from pmrlhf.data.tokenize import Encoder
    from pmrlhf.models.scoring import join

    vocab = {"<pad>": 0, "</s>": 1, "x": 2, "a": 3, "b": 4, "ab": 5}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>")
    assert tok("xab", add_special_tokens=False)["input_ids"] == [2, 5]  # the merge across the boundary
    encoder = Encoder(tok)
    [row] = sft.encoded([Demonstration(prompt="xa", response="b")], encoder)
    assert row == {"input_ids": [2, 3, 4, 1], "completion_mask": [0, 0, 1, 1]}
    ids, _, response_mask = join([encoder.prompt("xa")], [encoder.response("b")], tok.pad_token_id)
    assert ids[0].tolist() == row["input_ids"] and response_mask[0].tolist() == row["completion_mask"]


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_warmup_ratio_is_a_share_of_the_steps_as_in_every_stage(tmp_path, tiny_world_config, ratio):
    """A linear warm-up over ``ceil(ratio * steps)`` steps, then linear decay: ``warmup_ratio: 1.0`` warms up over
    every step (transformers read it as one step, and decayed over the rest)."""
    import json
    import math

    from pmrlhf.config import LoggingConfig
    from pmrlhf.io import read_jsonl

    config = sft.SFTConfig(
        run_dir=str(tmp_path),
        world=tiny_world_config,
        optim=OptimConfig(epochs=0.1, lr=1e-3, scheduler="linear", warmup_ratio=ratio, batch_size=8),
        logging=LoggingConfig(log_every=1),
    )
    sft.run(config)
    lrs = [r["learning_rate"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "learning_rate" in r]
    steps = len(lrs)
    assert steps >= 4, json.dumps(lrs)
    warmup = math.ceil(ratio * steps)
    expected = [1e-3 * (k / warmup if k < warmup else (steps - k) / (steps - warmup)) for k in range(steps)]
    assert lrs == pytest.approx(expected, abs=1e-12)
