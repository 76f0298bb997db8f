"""Stage 1: supervised fine-tuning on demonstrations, the loss on the response tokens only.

It trains in the loop every stage that fits a fixed set shares (``training/fit.py``: resume, guards, checkpoints,
schedule and logging from one place), on the token ids the encoder gives every later stage. Its loss is TRL's
``SFTTrainer``'s with ``completion_only_loss``: the mean negative log-likelihood of the batch's response tokens
(``tests/test_sft.py`` matches TRL's losses step by step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import ConfigError, DataConfig, ModelConfig, OptimConfig
from pmrlhf.data.sources import holdout
from pmrlhf.io import atomic_write_json, console
from pmrlhf.models import load_causal_lm, load_tokenizer, save_model
from pmrlhf.models.scoring import join, token_logprobs
from pmrlhf.stages.base import StageConfig
from pmrlhf.stages.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    tokenizer_source,
    write_objective,
)
from pmrlhf.training.fit import Fit, fit
from pmrlhf.training.guards import check_weights_finite
from pmrlhf.training.setup import (
    gathered_model,
    load_precisions,
    optim_accelerator,
    process_state,
    seed_everything,
)


@dataclass
class SFTConfig(StageConfig):
    """Stage 1 (``pmrlhf sft``)."""

    name: str = "sft"  # sub-folder of this stage's outputs
    data: DataConfig = field(default_factory=DataConfig)  # the demonstrations
    model: ModelConfig = field(default_factory=ModelConfig)  # the model to fine-tune; "" builds a tiny one
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, epochs=8, batch_size=32))
    train: bool = True  # false: the starting model (an instruct model) is the reference as it is, not trained

    def validate(self) -> None:
        if not self.train and not self.model.name_or_path:
            raise ConfigError("train: false keeps the starting model as it is: set model.name_or_path")


def encoded(records, encoder) -> list[tuple[list[int], list[int]]]:
    """Demonstrations as ``(prompt ids, response ids)``, the response ending with the end of sequence, as every
    later stage encodes them (a token that would merge across the boundary in one text stays split); prompts the
    encoder skips are left out."""
    pairs = ((encoder.prompt(r.prompt), r.response) for r in records)
    return [(prompt, encoder.response(response)) for prompt, response in pairs if prompt is not None]


def response_nll(model, examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    """``(summed negative log-likelihood of the response tokens, their number)`` of ``examples``."""
    device = next(model.parameters()).device
    ids, attn, response = (t.to(device) for t in join([p for p, _ in examples], [r for _, r in examples], pad_id))
    return -token_logprobs(model, ids, attn, keep=response).sum(), int(response.sum())


def _kept_as_it_is(config: SFTConfig, model, tokenizer, out: Path) -> Path:
    """The starting model saved as the reference, untrained (``train: false``)."""
    if process_state().is_main_process:
        save_model(model, tokenizer, out / "model")
        write_objective(out, {"method": "sft", "loss": f"none: {config.model.name_or_path} as it is"})
        atomic_write_json(out / "summary.json", {"steps": 0, "train_examples": 0})
    done = finish_stage(out)
    console.print(f"[green]{config.model.name_or_path} kept as the reference at {done / 'model'}[/green]")
    process_state().wait_for_everyone()
    return done / "model"


def run(config: SFTConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model``; return that path."""
    seed_everything(config.seed)
    accelerator = optim_accelerator(config.model, config.optim)
    main = accelerator.is_main_process  # every process trains on its share of each batch; one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    if config.train:  # the data is checked before any model is loaded; a reference kept as it is reads none
        records, report = load_stage_records(config.data, "demonstration", config.run_dir, config.world)
    tokenizer = load_tokenizer(tokenizer_source(config.model.name_or_path, config.data, config.run_dir, config.world))
    trainable, _ = load_precisions(config.model, accelerator.mixed_precision)
    if not config.train:  # loaded without LoRA's layers, to be saved as it is
        return _kept_as_it_is(config, load_causal_lm(trainable, tokenizer, trainable=False), tokenizer, out)
    model = load_causal_lm(trainable, tokenizer)
    encoder = stage_encoder(tokenizer, config.data, trainable)
    train_records, held_records = holdout(records, config.data.eval_fraction, config.data.split_seed)
    train, held = encoded(train_records, encoder), encoded(held_records, encoder)
    require_examples(config.name, len(train), len(records), encoder)
    pad_id = tokenizer.pad_token_id

    def batch_loss(model, share):
        total, tokens = response_nll(model, share, pad_id)
        return total / max(tokens, 1), {}

    final: dict[str, float] = {}  # the last evaluation: the loop evaluates after its last step, at the saved weights

    def evaluate(model) -> dict[str, float]:
        with torch.no_grad():
            parts = [
                response_nll(model, held[i : i + config.optim.batch_size], pad_id)
                for i in range(0, len(held), config.optim.batch_size)
            ]
        loss = sum(t.item() for t, _ in parts) / max(sum(n for _, n in parts), 1)
        final.update({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))})
        return dict(final)

    spec = Fit(
        name=config.name,
        batch_loss=batch_loss,
        evaluate=evaluate if held else None,
        eval_due=lambda step, end_of_epoch, last: end_of_epoch or last,
    )
    fitted = fit(accelerator, model, train, config, out, spec)
    check_weights_finite(f"{config.name}: the model to save", fitted.model)  # the last steps' were never checked
    plain = gathered_model(accelerator, fitted.model, lambda: load_causal_lm(trainable, tokenizer))
    if main:
        path = save_model(plain, tokenizer, out / "model")
        write_objective(out, {"method": "sft", "loss": "negative log-likelihood of the response tokens"})
        summary = {
            "steps": fitted.steps,
            "train_examples": len(train),
            "eval_examples": len(held),
            "data": report.summary(),
            "encoding": dict(encoder.counts),
        }
        if final:
            summary |= {"eval_loss": final["eval/loss"], "eval_perplexity": final["eval/perplexity"]}
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(
            f"[green]SFT model saved to {done / path.name}[/green]"
            + (f"  held-out perplexity {summary['eval_perplexity']:.3f}" if final else "")
        )
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
