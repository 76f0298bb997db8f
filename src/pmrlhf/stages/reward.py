"""Stage 2: the reward model, from comparisons (eq. (2.2)) or K-wise rankings (pairwise or Plackett-Luce).

Our own loop rather than TRL's ``RewardTrainer``: one code path serves K = 2 comparisons, InstructGPT's
K-wise batches (all C(K,2) pairs of a prompt in one batch element, one forward pass per response) and the
listwise loss, which ``RewardTrainer`` does not. Built on ``accelerate``.

Early stopping on held-out pairwise accuracy (the paper stops early against over-optimisation, Sec. 6); the
best model by that accuracy is the one saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, ModelConfig, OptimConfig, require
from pmrlhf.data.records import Comparison, Ranking
from pmrlhf.data.sources import holdout
from pmrlhf.data.tokenize import Encoder, pad
from pmrlhf.io import atomic_write_json, console
from pmrlhf.models import load_reward_model, load_tokenizer, save_model
from pmrlhf.models.scoring import sequence_scores
from pmrlhf.objectives.reward import REWARD_LOSSES, pair_accuracy
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
from pmrlhf.training.fit import BestModel, Fit, fit
from pmrlhf.training.guards import check_weights_finite
from pmrlhf.training.setup import gathered_model, load_precisions, optim_accelerator, seed_everything


@dataclass
class RewardConfig(StageConfig):
    """Stage 2 (``pmrlhf rm``)."""

    name: str = "reward"  # sub-folder of this stage's outputs
    data: DataConfig = field(default_factory=DataConfig)  # the comparisons or rankings
    data_kind: str = "comparison"  # comparison | ranking: pairs, or K-wise rankings
    loss: str = "pairwise"  # pairwise (eq. (2.2); all C(K,2) pairs for rankings) | listwise (Plackett-Luce, App. A.1)
    model: ModelConfig = field(default_factory=ModelConfig)  # the model the score head sits on
    init_from_sft: bool = True  # start from <run_dir>/sft/model when model.name_or_path is empty and it exists
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, epochs=3, batch_size=32))
    eval_every: int = 50  # optimiser steps between held-out evaluations (and at the end of every epoch)
    patience: int = 4  # evaluations without a better held-out accuracy before stopping; 0 never stops early

    def validate(self) -> None:
        require(self.loss in REWARD_LOSSES, f"unknown reward loss {self.loss!r}; use one of {sorted(REWARD_LOSSES)}")
        require(
            self.data_kind in ("comparison", "ranking"), f"data_kind must be comparison or ranking: {self.data_kind!r}"
        )
        require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        require(self.patience >= 0, f"patience must be >= 0 (0 never stops early), got {self.patience}")


def _ordered(records: list[Comparison | Ranking]) -> list[tuple[str, list[str]]]:
    """Each record as (prompt, responses best first)."""
    return [(r.prompt, [r.chosen, r.rejected]) if isinstance(r, Comparison) else (r.prompt, r.ordered) for r in records]


def _encode(items, encoder: Encoder) -> list[tuple[list[int], list[list[int]]]]:
    out = []
    for prompt, responses in items:
        ids = encoder.prompt(prompt)
        if ids is not None:
            out.append((ids, [encoder.response(r) for r in responses]))
    return out


def score_batch(model, batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over every response of every element: ``(scores [N, K], mask [N, K])``."""
    K = max(len(rs) for _, rs in batch)
    seqs, slots = [], []
    for n, (p, rs) in enumerate(batch):
        for k, r in enumerate(rs):
            seqs.append(p + r)
            slots.append((n, k))
    ids, attn = pad(seqs, pad_id, "right")
    device = next(model.parameters()).device
    flat = sequence_scores(model, ids.to(device), attn.to(device))
    scores = torch.zeros(len(batch), K, device=device)
    mask = torch.zeros(len(batch), K, dtype=torch.bool, device=device)
    n_idx = torch.tensor([s[0] for s in slots], device=device)
    k_idx = torch.tensor([s[1] for s in slots], device=device)
    scores = scores.index_put((n_idx, k_idx), flat)
    mask[n_idx, k_idx] = True
    return scores, mask


@torch.no_grad()
def evaluate(model, data, pad_id: int, batch_size: int) -> dict[str, float]:
    model.eval()
    correct = margin = pairs = 0.0
    for s in range(0, len(data), batch_size):
        scores, mask = score_batch(model, data[s : s + batch_size], pad_id)
        acc, mar = pair_accuracy(scores, mask)
        n = sum(len(rs) * (len(rs) - 1) / 2 for _, rs in data[s : s + batch_size])
        correct, margin, pairs = correct + acc.item() * n, margin + mar.item() * n, pairs + n
    model.train()
    return {"eval/accuracy": correct / max(pairs, 1), "eval/margin": margin / max(pairs, 1)}


def read_where_transformers_reads(model, tokenizer) -> str:
    """Make plain transformers read the saved reward model's score at the token pmrlhf reads, the response's end of
    sequence; say where it reads it. transformers reads the last token that is not the config's pad token, so
    where the pad token is the end of sequence (SmolLM2, Llama-3, GPT-2) it read the token before. The saved
    config then names another token that never ends a text as the pad token (the tokenizer's unknown or
    beginning-of-sequence token; pmrlhf itself reads by the attention mask), and the saved tokenizer pads with it.
    A tokenizer with no such token (GPT-2's one special token is all three) leaves transformers a token short."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return "the end of sequence"
    spare = [t for t in (tokenizer.unk_token, tokenizer.bos_token) if t and t != tokenizer.eos_token]
    if not spare:
        console.print(
            "[yellow]reward: the tokenizer's one special token pads and ends sequences, so plain transformers reads "
            "this model's score one token before pmrlhf does; score with pmrlhf or give the tokenizer a pad token"
            "[/yellow]"
        )
        return "the token before the end of sequence (no spare special token to pad with)"
    tokenizer.pad_token = spare[0]
    model.config.pad_token_id = tokenizer.pad_token_id  # a LoRA model's config is its base model's
    return f"the end of sequence (pad token {spare[0]!r})"


def run(config: RewardConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model`` (the best by held-out accuracy); return that path."""
    config.validate()
    seed_everything(config.seed)
    accelerator = optim_accelerator(config.model, config.optim)
    main = accelerator.is_main_process  # every process trains on its share of each batch; one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    records, report = load_stage_records(config.data, config.data_kind, config.run_dir, config.world)
    sft = Path(config.run_dir) / "sft" / "model"
    init = "" if config.model.name_or_path else (str(sft) if config.init_from_sft and sft.is_dir() else "")
    tokenizer = load_tokenizer(
        init or tokenizer_source(config.model.name_or_path, config.data, config.run_dir, config.world)
    )
    encoder = stage_encoder(tokenizer, config.data, config.model, init or None)
    train_items, held_items = holdout(_ordered(records), config.data.eval_fraction, config.data.split_seed)
    train, held = _encode(train_items, encoder), _encode(held_items, encoder)
    require_examples("reward", len(train), len(records), encoder)
    trainable, _ = load_precisions(config.model, accelerator.mixed_precision)
    model = load_reward_model(trainable, tokenizer, path=init or None)
    loss_fn, pad_id = REWARD_LOSSES[config.loss], tokenizer.pad_token_id

    def batch_loss(model, share):
        return loss_fn(*score_batch(model, share, pad_id)), {}

    spec = Fit(
        name=config.name,
        batch_loss=batch_loss,
        evaluate=(lambda model: evaluate(model, held, pad_id, config.optim.batch_size)) if held else None,
        eval_due=lambda step, end_of_epoch, last: step % config.eval_every == 0 or end_of_epoch or last,
        best=BestModel("eval/accuracy", config.patience),
    )
    fitted = fit(accelerator, model, train, config, out, spec)
    spec.best.load_into(fitted.model, accelerator)  # each process its own part, where parameters are sharded
    check_weights_finite(f"{config.name}: the model to save", fitted.model)  # the last steps' were never checked
    final = gathered_model(
        accelerator, fitted.model, lambda: load_reward_model(trainable, tokenizer, path=init or None)
    )
    if main:
        summary = {
            "steps": fitted.steps,
            "stopped_early": fitted.stopped_early,
            "best": spec.best.best,
            "train_examples": len(train),
            "eval_examples": len(held),
            "data": report.summary(),
            "encoding": dict(encoder.counts),
        }
        summary["read_by_transformers_at"] = read_where_transformers_reads(final, tokenizer)
        save_model(final, tokenizer, out / "model")
        write_objective(out, {"method": "reward", "loss": config.loss, "data_kind": config.data_kind})
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(
            f"[green]reward model saved to {done / 'model'}[/green]  held-out accuracy "
            f"{spec.best.best['eval/accuracy']:.3f}"
        )
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
