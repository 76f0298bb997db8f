"""The processes and the ``Accelerator`` a stage trains with: seeding, precision, the launch settings refused,
sharded models gathered to save, work done once on the main process."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import warnings
from pathlib import Path

import torch

from pmrlhf.config import InputError, ModelConfig, OptimConfig
from pmrlhf.io import console


def _cpu_deepspeed() -> None:
    """accelerate imports DeepSpeed, where installed, whenever it unwraps a model; without CUDA, DeepSpeed's device
    detection then warns on every process that it falls back to the CPU, which is the only device there is."""
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
    _cpu_deepspeed()
    # An earlier stage in this process fixed the shared state's precision; the process group stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision or HALF_TYPES.get(trainable.dtype),
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        warnings.warn(EMULATED_BF16, stacklevel=2)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise InputError(ZERO3_REFUSED)  # set in a DeepSpeed config file, which check_launch does not read
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
                raise InputError(
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
        raise InputError(ZERO3_REFUSED)
    if flag("ACCELERATE_USE_FSDP") and flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise InputError(
            "fsdp_cpu_ram_efficient_loading: true leaves every model that FSDP does not wrap (the frozen reference "
            "and reward models) uninitialised on all processes but the first; set it to false in the accelerate "
            "config"
        )


EMULATED_BF16 = (
    "bf16 mixed precision on a CPU without native bf16 (AVX512-BF16, AMX or Arm's BF16): PyTorch emulates it, "
    "several times slower than float32; set the model's dtype to float32 on this machine"
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively. Where that cannot be told (no /proc/cpuinfo on an Arm Mac),
    True: the warning it gates is for machines known to emulate."""
    import platform

    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return True
        return "bf16" in flags
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def frozen_autocast(accelerator):
    """The accelerator's mixed precision for what ``accelerator.prepare`` does not wrap: frozen models, and
    sampling, where one region over every token casts the weights once instead of at each step. A no-op without
    mixed precision."""
    import contextlib

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    return contextlib.nullcontext() if half is None else torch.autocast(accelerator.device.type, dtype=half)


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
    """accelerate's view of the processes, set up as the stages' Accelerators set it up (on CPU when no GPU); the
    console of every process but the main one is silenced from then on."""
    from accelerate import PartialState

    _cpu_deepspeed()
    state = PartialState(cpu=not torch.cuda.is_available())
    console.quiet = not state.is_main_process  # what a stage says, said once, not once per process
    return state


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


def mean_over_processes(accelerator, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Each value averaged over the processes, in one collective call."""
    if not values:
        return {}
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(()) for v in values.values()]
    )
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(values, stacked.tolist(), strict=True))


@contextlib.contextmanager
def threads_for(config):
    """Run on one thread while a command whose models are all tiny ones built from config runs; yield the count,
    and give the process its own count back after.

    Two threads that share their cores with another process spin and wait for each other (a busy machine made
    the demo several times slower: docs/performance.md), and a model this small gains nothing from a second one.
    A real model (any ``name_or_path``) keeps torch's default, and a count the user set (``OMP_NUM_THREADS``,
    which ``torchrun`` sets too) is left as it is. The count is chosen from the config alone, never from the
    machine's load, so a run repeats whatever else the machine is doing (and a run resumes on the count it ran
    on: the order of floating-point sums follows it)."""
    before = torch.get_num_threads()
    tiny = dataclasses.is_dataclass(config) and not any(_named_models(dataclasses.asdict(config)))
    if tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _named_models(settings):
    """Every model name or path in a config's settings, at any depth (a sweep's pipeline, a variant's policy)."""
    if isinstance(settings, dict):
        if settings.get("kind") == "realtext":  # a world sampled from a real model
            yield settings.get("text_model", "fetch:smollm2")
        for key, value in settings.items():
            if key == "name_or_path" and value:
                yield value
            elif key != "text_model":
                yield from _named_models(value)
    elif isinstance(settings, list):
        for value in settings:
            yield from _named_models(value)


def quiet_libraries() -> None:
    """Quiet the libraries' per-file bars for a command, then and not at start (importing them slowed every
    --help)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # peft reads transformers' deprecated name on every LoRA model it builds: a warning per stage that says nothing
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
