"""``pmrlhf dpo``: DPO, conservative DPO, robust DPO, IPO, SimPO, and preference-matching DPO (plain and
conditional), on comparisons.

Our own loop rather than TRL's ``DPOTrainer``: one loop serves all seven losses, three of which (SimPO and
the two PM variants) ``DPOTrainer`` does not have; where it has the same variant (``sigmoid``, ``ipo``,
``robust``) the first-step loss matches it (``tests/test_dpo_stage.py``). Reference log-probabilities are
computed once, before training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig, require
from pmrlhf.data.sources import holdout
from pmrlhf.data.world import WorldConfig
from pmrlhf.io import atomic_write_json
from pmrlhf.models import load_causal_lm, load_tokenizer, save_model
from pmrlhf.models.scoring import join, sequence_logprobs, token_logprobs
from pmrlhf.objectives import dpo
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

REFERENCE_FREE = {"simpo", "pm"}


@dataclass
class DPOConfig:
    """``pmrlhf dpo``."""

    run_dir: str = "runs/demo"  # the run folder every stage of a pipeline shares
    name: str = "dpo"  # sub-folder of this stage's outputs
    seed: int = 0  # seed of shuffling and dropout
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=lambda: DataConfig(portion="reward"))  # comparisons
    model: ModelConfig = field(default_factory=ModelConfig)  # policy and reference; "" = <run_dir>/sft/model
    loss: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing) | robust | ipo | simpo | pm | cpm
    beta: float = 0.1  # DPO's beta (the inverse temperature of the implicit reward)
    label_smoothing: float = 0.0  # cDPO's eps (sigmoid) or robust DPO's flip rate
    simpo_gamma: float = 1.0  # SimPO's target margin
    alpha: float = 0.1  # conditional PM-DPO: responses with pi_ref(y|x) >= alpha get the PM form
    checkpoint_every: int = 100  # optimiser steps between checkpoints to resume from; 0 writes none
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in <run_dir>/<name>.partial/checkpoints
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, epochs=2, batch_size=32))
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        if self.loss not in dpo.DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {self.loss!r}; known: {sorted(dpo.DPO_LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.loss == "cpm":
            require(
                0 < self.alpha <= 1,
                f"alpha must be in (0, 1] (the reference probability above which PM applies), got {self.alpha}",
            )
        if self.loss in ("sigmoid", "robust"):
            require(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def loss_fn(config: DPOConfig):
    """``f(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len) -> [N]`` for the config's loss."""
    b, eps = config.beta, config.label_smoothing
    table = {
        "sigmoid": lambda c, r, rc, rr, lc, lr: dpo.dpo_sigmoid(c, r, rc, rr, b, eps),
        "robust": lambda c, r, rc, rr, lc, lr: dpo.dpo_robust(c, r, rc, rr, b, eps),
        "ipo": lambda c, r, rc, rr, lc, lr: dpo.ipo(c, r, rc, rr, lc, lr, b),
        "simpo": lambda c, r, rc, rr, lc, lr: dpo.simpo(c, r, lc, lr, b, config.simpo_gamma),
        "pm": lambda c, r, rc, rr, lc, lr: dpo.pm_dpo(c, r, b),
        "cpm": lambda c, r, rc, rr, lc, lr: dpo.cpm_dpo(c, r, rc, rr, b, config.alpha),
    }
    return table[config.loss]


def batch_logprobs(model, pairs: list[tuple], pad_id: int):
    """Sequence log-probabilities and lengths of chosen and rejected, in one forward pass: ``4 x [N]``.

    ``pairs``: items whose first three fields are prompt, chosen and rejected token ids."""
    prompts = [x[0] for x in pairs] * 2
    responses = [x[1] for x in pairs] + [x[2] for x in pairs]
    device = next(model.parameters()).device
    ids, attn, resp = (t.to(device) for t in join(prompts, responses, pad_id))
    logp = (token_logprobs(model, ids, attn) * resp).sum(-1)
    length = resp.sum(-1).float()
    n = len(pairs)
    return logp[:n], logp[n:], length[:n], length[n:]


def _reference_logprobs(reference, pairs: list[tuple], pad_id: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi_ref`` of every pair's chosen and rejected response, ``2 x [N]``, on every process. Each process
    scores every n-th pair and the shares are gathered: the frozen model is each process's own copy, so the
    processes may run different numbers of forward passes."""
    from accelerate.utils import gather_object

    n, rank = accelerator.num_processes, accelerator.process_index
    share = pairs[rank::n]
    prompts = [p for p, _, _ in share]
    chosen, _ = sequence_logprobs(reference, prompts, [c for _, c, _ in share], pad_id)
    rejected, _ = sequence_logprobs(reference, prompts, [r for _, _, r in share], pad_id)
    ref_c, ref_r = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for p, (c, r) in enumerate(gather_object([(chosen.tolist(), rejected.tolist())])):
        ref_c[p::n], ref_r[p::n] = torch.tensor(c), torch.tensor(r)
    return ref_c, ref_r


def run(config: DPOConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model``; return that path."""
    config.validate()
    seed_everything(config.seed)
    accelerator = optim_accelerator(config.model, config.optim)
    main = accelerator.is_main_process  # every process trains on its share of each batch; one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    trainable, frozen = load_precisions(config.model, accelerator.mixed_precision)
    sft = Path(config.run_dir) / "sft" / "model"
    init = config.model.name_or_path or (str(sft) if sft.is_dir() else "")
    records, report = load_stage_records(config.data, "comparison", config.run_dir, config.world)
    tokenizer = load_tokenizer(init or tokenizer_source("", config.data, config.run_dir, config.world))
    enc = stage_encoder(tokenizer, config.data, config.model, init or None)
    pairs = []
    for r in records:
        p = enc.prompt(r.prompt)
        if p is not None:
            pairs.append((p, enc.response(r.chosen), enc.response(r.rejected)))
    policy = load_causal_lm(trainable, tokenizer, path=init or None)
    pad_id = tokenizer.pad_token_id
    if config.loss in REFERENCE_FREE:
        ref_c = ref_r = torch.zeros(len(pairs))
    else:
        reference = load_causal_lm(frozen, tokenizer, path=init or None, trainable=False).to(accelerator.device)
        ref_c, ref_r = _reference_logprobs(reference, pairs, pad_id, accelerator)
        del reference
    # (prompt, chosen, rejected, reference log pi(chosen), reference log pi(rejected))
    items = [(*x, ref_c[i].item(), ref_r[i].item()) for i, x in enumerate(pairs)]
    train, held = holdout(items, config.data.eval_fraction, config.data.split_seed)
    require_examples(config.name, len(train), len(records), enc)
    optimizer = adamw(policy.parameters(), accelerator, config.optim.lr, config.optim.weight_decay)
    total, scheduler = stage_schedule(optimizer, config.optim, len(train), accelerator.num_processes)
    bs, accum = config.optim.batch_size, config.optim.grad_accum
    policy, optimizer = accelerator.prepare(policy, optimizer)
    f = loss_fn(config)

    def step_loss(batch):
        c, r, lc, lr = batch_logprobs(policy, batch, pad_id)
        rc = torch.tensor([x[3] for x in batch], device=c.device)
        rr = torch.tensor([x[4] for x in batch], device=c.device)
        losses = f(c, r, rc, rr, lc, lr)
        margin = (c - rc) - (r - rr)
        return losses.mean(), {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}

    rng = random.Random(config.seed)
    step, window, start_batch = 0, None, 0
    found, log = checkpoints.begin(accelerator, out, config, "step", checkpoints.MAY_CHANGE)
    if found:
        state, path = found
        step, start_batch = checkpoints.resume_loop(state, rng, scheduler)
        console.print(f"resumed {config.name} at step {step} from {path}")
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=not main) as progress:
        task = progress.add_task(config.name, total=total, completed=step)
        while step < total:
            epoch_rng = rng.getstate()  # a checkpoint replays this epoch's order from here
            for b, indices in enumerate(epoch_batches(len(train), bs, rng, accelerator.num_processes)):
                if b < start_batch:
                    continue
                share, weight = process_share([train[i] for i in indices], accelerator)
                with accelerator.accumulate(policy):
                    loss, stats = step_loss(share)
                    optimizer_step(
                        accelerator,
                        policy,
                        optimizer,
                        loss * weight,
                        config.optim.max_grad_norm,
                        f"{config.name}: step {step + 1}",
                    )
                local = torch.tensor([loss.item(), *stats.values()], device=accelerator.device)
                batch = accelerator.reduce(local * weight, "mean") / accum  # the whole batch's loss and stats
                window = batch if window is None else window + batch
                if not accelerator.sync_gradients:  # within an accumulation window: no optimiser step yet
                    continue
                means, window = window.tolist(), None
                row = {"train/loss": means[0], **{f"train/{k}": v for k, v in zip(stats, means[1:], strict=True)}}
                row["train/lr"] = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                progress.update(task, advance=1, description=f"{config.name}  loss {means[0]:.4f}")
                if held and (step % config.logging.log_every == 0 or step == total):
                    with torch.no_grad():
                        held_loss, held_stats = step_loss(held)
                    row |= {"eval/loss": held_loss.item(), **{f"eval/{k}": v for k, v in held_stats.items()}}
                if log is not None and (step % config.logging.log_every == 0 or step == total):
                    log.log(step, row)
                if step >= total:
                    break
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    state = checkpoints.loop_state(config, step, epoch_rng, b + 1, scheduler)
                    checkpoints.save(
                        accelerator, out / "checkpoints", f"step-{step:06d}", state, config.keep_checkpoints
                    )
            start_batch = 0
    if log is not None:
        log.close()
    accelerator.wait_for_everyone()
    final = gathered_model(accelerator, policy, lambda: load_causal_lm(trainable, tokenizer, path=init or None))
    if main:
        path = save_model(final, tokenizer, out / "model")
        # Read by `pmrlhf eval`: the loss's implicit target has the form of the PPO closed forms with coef = beta.
        objective = {
            "method": "dpo",
            "loss": config.loss,
            "beta": config.beta,
            "alpha": config.alpha if config.loss == "cpm" else None,
            "label_smoothing": config.label_smoothing if config.loss in ("sigmoid", "robust") else 0.0,
            "simpo_gamma": config.simpo_gamma if config.loss == "simpo" else None,
        }
        summary = {
            "loss": config.loss,
            "penalty": f"dpo:{config.loss}",
            "beta": 1.0,
            "coef": config.beta,
            "penalty_kwargs": {"alpha": config.alpha} if config.loss == "cpm" else {},
            "objective": objective,
            "steps": step,
            "train_examples": len(train),
            "data": report.summary(),
        }
        if config.data.source == "world":
            from pmrlhf.evaluation.exact import compare_with_closed_forms
            from pmrlhf.models import load_reward_model

            reward_path = Path(config.run_dir) / "reward" / "model"
            if reward_path.is_dir() and init:
                device = accelerator.device
                reference = load_causal_lm(config.model, tokenizer, path=init, trainable=False).to(device)
                rm = load_reward_model(config.model, tokenizer, path=reward_path, trainable=False).to(device)
                summary["world"] = compare_with_closed_forms(
                    final.eval(), reference, rm, tokenizer, world_dir(config.run_dir), objective
                )
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(f"[green]{config.name} saved to {done / path.name}[/green]")
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
