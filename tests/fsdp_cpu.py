"""``python tests/fsdp_cpu.py ARGS``: ``pmrlhf ARGS`` with the reward, DPO and PPO stages on FSDP2, set up as
``configs/accelerate/fsdp.yaml`` says.

accelerate only sets FSDP up on accelerators, but PyTorch's FSDP2 also runs on CPU processes over gloo. This turns
each stage's Accelerator to FSDP before it prepares anything, as accelerate itself would have done, so that
sharded training, gathering and checkpoints run here.
"""

import os
import sys
from pathlib import Path

import yaml

from pmrlhf.stages import dpo, ppo, reward

CONFIG = Path(__file__).parent.parent / "configs" / "accelerate" / "fsdp.yaml"


def _on_fsdp(make_accelerator):
    def make(*args, **kwargs):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = make_accelerator(*args, **kwargs)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the settings from FSDP_* below
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it
        return accelerator

    return make


# The environment that `accelerate launch` derives from the config (the flag that turns FSDP on stays unset: on
# CPU accelerate would answer it with DDP)
for key, value in yaml.safe_load(CONFIG.read_text())["fsdp_config"].items():
    os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
for stage in (dpo, ppo, reward):
    stage.stage_accelerator = _on_fsdp(stage.stage_accelerator)

if __name__ == "__main__":
    from pmrlhf.cli import app

    sys.argv[0] = "pmrlhf"
    app()
