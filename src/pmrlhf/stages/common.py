"""What every stage does the same way: the run folder, the data source, the tokenizer, seeding, the console."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random

import torch
from rich.console import Console

from pmrlhf.config import ModelConfig, OptimConfig
from pmrlhf.stages.guards import check_finite

console = Console(stderr=True)

# accelerate imports DeepSpeed, where installed, whenever it unwraps a model; without CUDA, DeepSpeed's device
# detection then warns on every process that it falls back to the CPU, which is the only device there is.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


HALF_TYPES = {"bfloat16": "bf16", "float16": "fp16"}  # a ModelConfig.dtype -> accelerate's mixed precision


def stage_accelerator(
    trainable: ModelConfig,
    micro_batch_size: int,
    max_grad_norm: float,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
):
    """The stage's ``Accelerator``. Its precision is ``mixed_precision`` when given, else the half type that the
    trainable model's ``dtype`` names, else what ``accelerate launch`` was configured with (no outside it).

    A half ``dtype`` on a model that trains thus means mixed precision, never half weights: a bf16 weight rounds
    away every Adam update below 2^-8 of itself, which at the learning rates of fine-tuning is most of them.

    Under DeepSpeed the engine, not the stage, cuts micro-batches, accumulates and clips, from its own config:
    ``micro_batch_size`` (examples per process in one backward pass), ``gradient_accumulation_steps`` and
    ``max_grad_norm`` fill it where the launch config leaves them to accelerate, and a launch config that sets
    them otherwise is refused (accelerate would silently take its values over the stage's).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    check_launch()
    # An earlier stage in this process fixed the shared state's precision; the process group stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision or HALF_TYPES.get(trainable.dtype),
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise ValueError(ZERO3_REFUSED)  # set in a DeepSpeed config file, which check_launch does not read
        stage = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_clipping": float(max_grad_norm),
        }
        for key, value in stage.items():
            given = plugin.deepspeed_config.get(key, "auto")
            if given == "auto":
                plugin.deepspeed_config[key] = value
            elif float(given) != value:
                raise ValueError(
                    f"the DeepSpeed config sets {key}: {given}, but this stage's config asks for {value}; leave it "
                    "out of the accelerate config (or set it to auto) so that the stage's setting is used"
                )
    return accelerator


def optim_accelerator(trainable: ModelConfig, optim: OptimConfig):
    """``stage_accelerator`` of a stage that trains by ``optim``: its micro-batch size, clipping and accumulation."""
    return stage_accelerator(
        trainable, optim.batch_size, optim.max_grad_norm, gradient_accumulation_steps=optim.grad_accum
    )


ZERO3_REFUSED = (
    "DeepSpeed ZeRO-3 is not supported: under it transformers partitions every model it loads, the frozen "
    "reference and reward models included, which no DeepSpeed engine then gathers. Shard parameters with FSDP "
    "instead (configs/accelerate/fsdp.yaml), or use ZeRO-2"
)


def check_launch() -> None:
    """Refuse, before any work, the ``accelerate launch`` settings under which the stages would go wrong.

    * DeepSpeed ZeRO-3 (``ZERO3_REFUSED``).
    * ``fsdp_cpu_ram_efficient_loading``: transformers then loads real weights on the first process of a node only,
      leaving the others' uninitialised for FSDP to overwrite when it wraps the model. The stages also load models
      that FSDP never wraps (the frozen reference and reward models, the copy a sharded model is gathered into),
      which would keep arbitrary weights on every other process.
    """
    flag = lambda name: os.environ.get(name, "false").lower() in ("1", "true", "yes")  # noqa: E731
    if flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ValueError(ZERO3_REFUSED)
    if flag("ACCELERATE_USE_FSDP") and flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading: true leaves every model that FSDP does not wrap (the frozen reference "
            "and reward models) uninitialised on all processes but the first; set it to false in the accelerate "
            "config"
        )


def parameters_sharded(accelerator) -> bool:
    """Whether no process holds whole parameters (FSDP; ZeRO-3 is refused): every forward pass then gathers them
    from all processes, so every process must make the same passes, and saving means gathering first."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def gathered_model(accelerator, model, rebuild):
    """The trained model whole, as a plain module on the main process (None on the others), to save or evaluate.

    Without sharded parameters this is the prepared model itself. With them, every process must call this: the
    weights are gathered from all processes and loaded into ``rebuild()``, a fresh model of the same structure
    built on the main process.
    """
    if not parameters_sharded(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    plain = rebuild()
    plain.load_state_dict(state)
    return plain


def process_state():
    """accelerate's view of the processes, set up as the stages' Accelerators set it up (on CPU when no GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_device() -> torch.device:
    """This process's device (its own GPU under ``accelerate launch``), for models that no Accelerator prepares."""
    return process_state().device


def on_the_main_process(fn):
    """Run ``fn`` on the main process alone while the others wait for it, and return its result there (None
    elsewhere). For work that trains nothing: every process would do the same work and write the same files."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        state = process_state()
        result = fn(*args, **kwargs) if state.is_main_process else None
        state.wait_for_everyone()
        return result

    return run


def load_precisions(model: ModelConfig, mixed_precision: str) -> tuple[ModelConfig, ModelConfig]:
    """(trainable, frozen) loading options under an accelerator's ``mixed_precision``: with a half type, float32
    master weights and copies held in that type; without, the model's own ``dtype`` for both."""
    half = {v: k for k, v in HALF_TYPES.items()}.get(mixed_precision)
    if half is None:
        return model, model
    return dataclasses.replace(model, dtype="float32"), dataclasses.replace(model, dtype=half)


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


def lr_schedule(optimizer, optim: OptimConfig, steps: int):
    """The learning-rate schedule ``optim.scheduler`` names over ``steps`` optimiser steps, after a linear warm-up
    over the first ``optim.warmup_ratio`` of them: transformers' schedules, as the SFT stage's Trainer runs them.

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
    add Python around the same calls (a sixth of a tiny model's optimiser step), so they are bypassed there.
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
