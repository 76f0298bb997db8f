"""The SFT stage: TRL's SFTTrainer's losses, on the token ids every later stage uses, by the stage's schedule."""

import pytest

from pmrlhf.config import ModelConfig, OptimConfig
from pmrlhf.stages import sft

ROWS = [
    ("q1 :", "w3 w4"),
    ("q2 :", "w6"),
    ("q0 :", "w1 w2 w3"),
    ("q3 :", "w2 w5 w7 w1"),
    ("q1 :", "w9"),
    ("q2 :", "w8 w8"),
    ("q0 :", "w4 w3 w2"),
    ("q3 :", "w11 w10"),
]


def test_losses_match_trls_sft_trainer_step_by_step(tmp_path):
    """The same tiny model, the same token ids (prompt and response encoded apart, the response ending with EOS),
    one batch of every example per step, AdamW at a constant rate with clipping: TRL's ``SFTTrainer`` (response
    tokens only) and the stage log the same loss at each of six steps."""
    import dataclasses

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from pmrlhf.config import DataConfig, LoggingConfig
    from pmrlhf.data.tokenize import Encoder, word_tokenizer
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.io import read_jsonl
    from pmrlhf.models import load_causal_lm, load_tokenizer, save_model

    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4, vocab_words=12)).vocabulary())
    torch.manual_seed(0)
    init = save_model(load_causal_lm(ModelConfig(), tok), tok, tmp_path / "init")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "{p}", "response": "{r}"}}\n' for p, r in ROWS))
    steps, lr = 6, 3e-3
    sft.run(
        sft.SFTConfig(
            run_dir=str(tmp_path / "run"),
            data=DataConfig(source=str(tmp_path / "data.jsonl"), portion="all", eval_fraction=0.0),
            model=ModelConfig(name_or_path=str(init)),
            optim=OptimConfig(lr=lr, epochs=steps, batch_size=len(ROWS)),
            checkpoint_every=0,
            logging=LoggingConfig(log_every=1),
        )
    )
    ours = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "sft" / "metrics.jsonl")]

    tokenizer, encoder = load_tokenizer(init), Encoder(load_tokenizer(init))
    rows = []
    for prompt, response in ROWS:
        p, r = encoder.prompt(prompt), encoder.response(response)
        rows.append({"input_ids": p + r, "completion_mask": [0] * len(p) + [1] * len(r)})
    names = {f.name for f in dataclasses.fields(TRLConfig)}  # transformers 5 renamed it
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = TRLConfig(
        **{checkpointing: False},
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(ROWS),
        num_train_epochs=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        completion_only_loss=True,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(init),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    theirs = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(ours) == len(theirs) == steps
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours[-1] < 0.9 * ours[0]  # it learns


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
    [(prompt, response)] = sft.encoded([Demonstration(prompt="xa", response="b")], encoder)
    assert (prompt, response) == ([2, 3], [4, 1])
    ids, _, response_mask = join([prompt], [response], tok.pad_token_id)
    assert ids[0].tolist() == [2, 3, 4, 1] and response_mask[0].tolist() == [0, 0, 1, 1]


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
    lrs = [r["train/lr"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl")]
    steps = len(lrs)
    assert steps >= 4, json.dumps(lrs)
    warmup = math.ceil(ratio * steps)
    expected = [1e-3 * (k / warmup if k < warmup else (steps - k) / (steps - warmup)) for k in range(steps)]
    assert lrs == pytest.approx(expected, abs=1e-12)
