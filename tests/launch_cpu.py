"""``python tests/launch_cpu.py fsdp|deepspeed ARGS``: ``pmrlhf ARGS`` with the reward, DPO and PPO stages on FSDP2
or on DeepSpeed ZeRO-2, set up as ``configs/accelerate/fsdp.yaml`` or ``deepspeed_zero2.yaml`` says.

accelerate sets FSDP and DeepSpeed up only on accelerators, but PyTorch's FSDP2 and DeepSpeed (through its CPU
accelerator) also run on CPU processes over gloo. This exports the environment that ``accelerate launch`` derives
from the config and turns each stage's Accelerator to FSDP or DeepSpeed as it is built, as accelerate itself would
have done on GPUs, so that sharded training, gathering and checkpoints run here. Variables already set win over
the config's. Its mixed precision is left out (float32, comparable with one process) unless
``ACCELERATE_MIXED_PRECISION`` is set.
"""

import functools
import os
import sys
from pathlib import Path

import torch
import yaml

from pmrlhf.stages import dpo, ppo, reward, sft

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def _fsdp_environment() -> None:
    # the flag that turns FSDP on stays unset: on CPU accelerate would answer it with DDP
    for key, value in yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"].items():
        os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)


# accelerate launch's environment variable for each key of a DeepSpeed accelerate config
DEEPSPEED_VARIABLES = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
}


def _deepspeed_environment() -> None:
    ds = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    for key, value in ds.items():
        os.environ.setdefault(DEEPSPEED_VARIABLES[key], str(value).lower() if isinstance(value, bool) else str(value))
    os.environ |= {"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu"}


def _switch(accelerator, backend: str) -> None:
    """What ``AcceleratorState`` does for ``backend`` when not told to stay on the CPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if backend == "fsdp":
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads its settings from the FSDP_* variables
        kind = DistributedType.FSDP
    else:
        plugin = DeepSpeedPlugin()  # reads its settings from the ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state._mixed_precision = "no"  # DeepSpeed's engine does the mixed precision
        accelerator.deepspeed_engine_wrapped = None
        kind = DistributedType.DEEPSPEED
    state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind


def _on(backend: str, run):
    """A stage's ``run`` whose ``Accelerator`` (and under SFT the Trainer's) is switched to ``backend`` as it is
    built, so that the stage's own checks of the distributed type see it."""
    import accelerate
    import transformers.trainer

    class Switched(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _switch(self, backend)

        def prepare(self, *args, **kwargs):
            """Also says what each model became, for the tests to check that the backend is the one asked for."""
            prepared = super().prepare(*args, **kwargs)
            for obj in prepared if isinstance(prepared, (tuple, list)) else (prepared,):
                if isinstance(obj, torch.nn.Module):
                    print(f"prepared {type(obj).__name__}", file=sys.stderr)
            return prepared

    @functools.wraps(run)
    def switched(*args, **kwargs):
        original = accelerate.Accelerator, transformers.trainer.Accelerator
        accelerate.Accelerator = transformers.trainer.Accelerator = Switched
        try:
            return run(*args, **kwargs)
        finally:
            accelerate.Accelerator, transformers.trainer.Accelerator = original

    return switched


if __name__ == "__main__":
    backend = sys.argv.pop(1)
    {"fsdp": _fsdp_environment, "deepspeed": _deepspeed_environment}[backend]()
    for stage in (sft, reward, dpo, ppo):
        stage.run = _on(backend, stage.run)
    from pmrlhf.cli import main

    sys.argv[0] = "pmrlhf"
    main()
