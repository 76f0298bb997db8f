"""Stage 2: the reward model, from comparisons (eq. (2.2)) or K-wise rankings (pairwise or Plackett-Luce).

Our own loop rather than TRL's ``RewardTrainer``: one code path serves K = 2 comparisons, InstructGPT's
K-wise batches (all C(K,2) pairs of a prompt in one batch element, one forward pass per response) and the
listwise loss, which ``RewardTrainer`` does not. Built on ``accelerate``.

Early stopping on held-out pairwise accuracy (the paper stops early against over-optimisation, Sec. 6); the
best model by that accuracy is the one saved.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig
from pmrlhf.data.records import Comparison, Ranking
from pmrlhf.data.sources import holdout
from pmrlhf.data.tokenize import Encoder, pad
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.io import atomic_write_json
from pmrlhf.models import load_reward_model, load_tokenizer, save_model
from pmrlhf.objectives.reward import REWARD_LOSSES, pair_accuracy
from pmrlhf.stages import checkpoints
from pmrlhf.stages.common import (
    adamw,
    console,
    epoch_batches,
    gathered_model,
    load_precisions,
    optim_accelerator,
    optimizer_step,
    process_share,
    seed_everything,
    stage_schedule,
)
from pmrlhf.stages.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    tokenizer_source,
    world_dir,
)


@dataclass
class RewardConfig:
    """Stage 2 (``pmrlhf rm``)."""

    run_dir: str = "runs/demo"  # the run folder every stage of a pipeline shares
    name: str = "reward"  # sub-folder of this stage's outputs
    seed: int = 0  # seed of the score head, shuffling and dropout
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=lambda: DataConfig(portion="reward"))
    data_kind: str = "comparison"  # comparison | ranking: pairs, or K-wise rankings
    loss: str = "pairwise"  # pairwise (eq. (2.2); all C(K,2) pairs for rankings) | listwise (Plackett-Luce, App. A.1)
    model: ModelConfig = field(default_factory=ModelConfig)
    init_from_sft: bool = True  # start from <run_dir>/sft/model when model.name_or_path is empty and it exists
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, epochs=3, batch_size=32))
    eval_every: int = 50  # optimiser steps between held-out evaluations (and at the end of every epoch)
    patience: int = 4  # evaluations without a better held-out accuracy before stopping; 0 never stops early
    checkpoint_every: int = 100  # optimiser steps between checkpoints to resume from; 0 writes none
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in <run_dir>/<name>.partial/checkpoints
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
    flat = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, 0].float()
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


@torch.no_grad()
def truth_distance(model, tokenizer, world: World, held: list[tuple[str, list[str]]]) -> dict[str, float]:
    """Mean |sigma(r_theta(y1) - r_theta(y2)) - sigma(r*(y1) - r*(y2))| on held-out pairs and on all of M(x)."""
    from pmrlhf.evaluation.exact import rewards_over_m, truth_over_m

    scores, mask = rewards_over_m(model, tokenizer, world)
    truth = truth_over_m(world)
    index = {p.prompt: (i, {y: j for j, y in enumerate(p.responses)}) for i, p in enumerate(world.prompts)}
    gaps = []
    for prompt, rs in held:
        i, where = index[prompt]
        for a in range(len(rs)):
            for b in range(a + 1, len(rs)):
                ja, jb = where[rs[a]], where[rs[b]]
                learned = torch.sigmoid(scores[i, ja] - scores[i, jb])
                true = torch.sigmoid(truth["reward"][i, ja] - truth["reward"][i, jb])
                gaps.append((learned - true).abs().item())
    diff_l = scores[:, :, None] - scores[:, None, :]
    diff_t = truth["reward"][:, :, None] - truth["reward"][:, None, :]
    pair_mask = mask[:, :, None] & mask[:, None, :] & ~torch.eye(mask.shape[1], dtype=torch.bool)[None]
    all_gap = (torch.sigmoid(diff_l) - torch.sigmoid(diff_t)).abs()[pair_mask].mean().item()
    return {"truth/held_out_pair_gap": sum(gaps) / max(len(gaps), 1), "truth/all_pairs_gap": all_gap}


def run(config: RewardConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model`` (the best by held-out accuracy); return that path."""
    if config.loss not in REWARD_LOSSES:
        raise ValueError(f"unknown reward loss {config.loss!r}; use one of {sorted(REWARD_LOSSES)}")
    if config.data_kind not in ("comparison", "ranking"):
        raise ValueError(f"data_kind must be 'comparison' or 'ranking', got {config.data_kind!r}")
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
    optimizer = adamw(model.parameters(), accelerator, config.optim.lr, config.optim.weight_decay)
    total, scheduler = stage_schedule(optimizer, config.optim, len(train), accelerator.num_processes)
    bs, accum = config.optim.batch_size, config.optim.grad_accum
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = REWARD_LOSSES[config.loss]

    rng = random.Random(config.seed)
    best = {"eval/accuracy": -1.0}
    best_state, stale, step, window_loss = None, 0, 0, 0.0
    stopped_early = False
    start_batch = 0  # where in its epoch a resumed run picks up
    found, log = checkpoints.begin(accelerator, out, config, "step", checkpoints.MAY_CHANGE)
    if found:
        state, path = found
        step, start_batch = checkpoints.resume_loop(state, rng, scheduler)
        best, stale = state["best"], state["stale"]
        best_state = checkpoints.per_process(path, "best", accelerator) if state["has_best"] else None
        console.print(f"resumed {config.name} at step {step} from {path}")
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=not main) as progress:
        task = progress.add_task("reward model", total=total, completed=step)
        while step < total and not stopped_early:
            epoch_rng = rng.getstate()  # a checkpoint replays this epoch's order from here
            batches = epoch_batches(len(train), bs, rng, accelerator.num_processes)
            for b, indices in enumerate(batches):
                if b < start_batch:
                    continue
                share, weight = process_share([train[i] for i in indices], accelerator)
                with accelerator.accumulate(model):
                    scores, mask = score_batch(model, share, tokenizer.pad_token_id)
                    loss = loss_fn(scores, mask)
                    optimizer_step(
                        accelerator,
                        model,
                        optimizer,
                        loss * weight,
                        config.optim.max_grad_norm,
                        f"reward: step {step + 1}",
                    )
                window_loss += accelerator.reduce(loss.detach() * weight, "mean").item() / accum
                if not accelerator.sync_gradients:  # within an accumulation window: no optimiser step yet
                    continue
                row = {"train/loss": window_loss, "train/lr": scheduler.get_last_lr()[0]}
                scheduler.step()
                step, window_loss = step + 1, 0.0
                progress.update(task, advance=1, description=f"reward model  loss {row['train/loss']:.3f}")
                end_of_epoch = b >= len(batches) - accum  # the epoch's last optimiser step
                if held and (step % config.eval_every == 0 or end_of_epoch or step >= total):
                    metrics = evaluate(model, held, tokenizer.pad_token_id, bs)
                    row |= metrics
                    if metrics["eval/accuracy"] > best["eval/accuracy"]:
                        best, stale = {**metrics, "step": step}, 0
                        best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
                    else:
                        stale += 1
                        stopped_early = config.patience > 0 and stale >= config.patience
                if log is not None and (step % config.logging.log_every == 0 or "eval/accuracy" in row):
                    log.log(step, row)
                last = step >= total or stopped_early  # the end is saved as the model, not as a checkpoint
                if config.checkpoint_every and step % config.checkpoint_every == 0 and not last:
                    state = checkpoints.loop_state(
                        config,
                        step,
                        epoch_rng,
                        b + 1,
                        scheduler,
                        best=best,
                        stale=stale,
                        has_best=best_state is not None,
                    )
                    best_file = {"best": best_state} if best_state is not None else None
                    root = out / "checkpoints"
                    checkpoints.save(accelerator, root, f"step-{step:06d}", state, config.keep_checkpoints, best_file)
                if last:
                    break
            start_batch = 0
    if log is not None:
        log.close()
    accelerator.wait_for_everyone()
    if best_state is not None:  # each process its own part, where parameters are sharded
        accelerator.unwrap_model(model).load_state_dict(best_state)
    final = gathered_model(accelerator, model, lambda: load_reward_model(trainable, tokenizer, path=init or None))
    if main:
        summary = {
            "steps": step,
            "stopped_early": stopped_early,
            "best": best,
            "train_examples": len(train),
            "eval_examples": len(held),
            "data": report.summary(),
            "encoding": dict(encoder.counts),
        }
        if config.data.source == "world":
            summary |= truth_distance(final, tokenizer, World.load(world_dir(config.run_dir)), held_items)
        save_model(final, tokenizer, out / "model")
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(
            f"[green]reward model saved to {done / 'model'}[/green]  held-out accuracy {best['eval/accuracy']:.3f}"
            + (f"  |p_theta - p*| {summary['truth/all_pairs_gap']:.3f}" if "truth/all_pairs_gap" in summary else "")
        )
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
