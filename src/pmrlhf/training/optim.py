"""Optimiser, schedule and batches: AdamW, transformers' schedules, seeded epochs cut into global batches dealt
out to the processes, and one optimiser step (backward, clip, step) under every launch."""

from __future__ import annotations

import math
import random

import torch

from pmrlhf.config import OptimConfig
from pmrlhf.training.guards import check_finite


def epoch_batches(n: int, batch_size: int, rng: random.Random, processes: int = 1) -> list[list[int]]:
    """One pass over ``n`` examples in a seeded order, cut into global batches of indices: ``batch_size`` per
    process, ``process_share`` deals them out. A last batch with fewer elements than processes is dropped, as
    some process would have no share of it."""
    order = list(range(n))
    rng.shuffle(order)
    size = batch_size * processes
    return [order[s : s + size] for s in range(0, n, size) if min(size, n - s) >= processes]


def batches_per_pass(n: int, batch_size: int, processes: int = 1) -> int:
    """How many batches ``epoch_batches`` cuts ``n`` examples into."""
    size = batch_size * processes
    return n // size + (n % size >= processes)


def process_share(batch: list, accelerator) -> tuple[list, float]:
    """This process's share of a global batch that every process holds in full, and the weight that turns the
    mean loss over its share into its part of the batch mean once DDP has averaged the processes' gradients.

    For a loss that is a mean over batch elements this is exact, shares of unequal size included. A batch with
    fewer elements than processes would leave some process nothing; ``epoch_batches`` makes none.
    """
    n = accelerator.num_processes
    share = batch[accelerator.process_index :: n]
    return share, len(share) * n / len(batch)


def token_mean_share(accelerator, mask: torch.Tensor) -> torch.Tensor:
    """The factor that turns a mean over this process's tokens (``mask``) into its part of the mean over every
    process's tokens, once DDP has averaged the processes' gradients."""
    if accelerator.num_processes == 1:
        return torch.tensor(1.0, device=mask.device)
    local = mask.sum().float()
    return local * accelerator.num_processes / accelerator.reduce(local.clone(), "sum").clamp(min=1)


def lr_schedule(optimizer, optim: OptimConfig, steps: int):
    """The learning-rate schedule ``optim.scheduler`` names over ``steps`` optimiser steps, after a linear warm-up
    over the first ``optim.warmup_ratio`` of them: transformers' schedules, as its Trainer runs them.

    The stage steps it after each optimiser step. It is not given to ``accelerator.prepare``, which would step it
    once per process at every call: there each process's data loader holds only its share of the steps, whereas
    here every process takes every global batch.
    """
    from transformers import get_scheduler

    name = "constant_with_warmup" if optim.scheduler == "constant" else optim.scheduler
    warmup = math.ceil(optim.warmup_ratio * steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def stage_schedule(optimizer, optim: OptimConfig, examples: int, processes: int):
    """``(optimiser steps, schedule)`` of a stage that makes ``optim.epochs`` passes over ``examples`` in global
    batches (``epoch_batches``), ``optim.grad_accum`` of them to a step; a last window short of that is dropped.

    Build it on the optimiser itself, before accelerate or DeepSpeed wrap it: they step it, and the schedule
    sees that.
    """
    micro_batches = batches_per_pass(examples, optim.batch_size, processes) * optim.epochs
    steps = max(1, int(micro_batches) // optim.grad_accum)
    return steps, lr_schedule(optimizer, optim, steps)


def adamw(params, accelerator, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused (one kernel for all of them) where the setup allows it.

    Fused is several times faster than the per-tensor loop for small models; it is left off under FSDP and
    DeepSpeed, which shard or replace the optimizer themselves.
    """
    from accelerate.utils import DistributedType

    simple = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=simple)


def optimizer_step(accelerator, model, optimizer, loss, max_grad_norm: float, where: str = "training") -> None:
    """Backward, clip the gradient norm (when ``max_grad_norm`` > 0), step, clear the gradients.

    A non-finite loss, or gradient norm, stops the run before the step (``guards``); ``where`` names the stage
    and step in that message. On one process without loss scaling or accumulation, accelerate's wrappers only
    add Python around the same calls (a noticeable share of a tiny model's step), so they are bypassed there.
    Under DeepSpeed the model's own engine does all of it.
    """
    from accelerate.utils import DistributedType

    check_finite(where, "the loss", loss)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The prepared model is its own engine. accelerator.backward would use the engine prepared last, which in
        # PPO is the critic's: the actor's engine would never step. Clipping is the engine's (its config's
        # gradient_clipping), as is accumulation.
        model.backward(loss)
        model.step()
        return
    plain = (
        accelerator.distributed_type == DistributedType.NO
        and accelerator.scaler is None
        and accelerator.gradient_accumulation_steps == 1
    )
    if not plain:
        accelerator.backward(loss)
        # within an accumulation window the gradients are partial (and under DDP not yet averaged): clip the whole
        if max_grad_norm and accelerator.sync_gradients:
            # fp16's loss scaler skips steps with inf gradients itself; any other non-finite norm is a real one
            norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            if accelerator.scaler is None:
                check_finite(where, "the gradient norm", norm)
        optimizer.step()
        optimizer.zero_grad()
        return
    loss.backward()
    if max_grad_norm:
        norm = clip_grad_norm([p.grad for p in model.parameters() if p.grad is not None], max_grad_norm)
        check_finite(where, "the gradient norm", norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.step()
    inner.zero_grad()


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` on gradients of one device, with the multi-tensor norm and scaling that
    it uses only on GPUs; the same arithmetic, so the same result bit for bit. Returns the norm before clipping."""
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
