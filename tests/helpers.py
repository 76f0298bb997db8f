"""What several test modules share: reading saved weights, and launching a stage on two CPU processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model folder written by ``save_model``."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def torchrun(*args: str, backend: str = "ddp", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m pmrlhf ARGS`` on two processes (gloo), one thread each, on a free port; with ``backend`` fsdp or
    deepspeed, the training stages on FSDP2 or DeepSpeed ZeRO-2 (``launch_cpu.py``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    program = ["-m", "pmrlhf"] if backend == "ddp" else [str(Path(__file__).with_name("launch_cpu.py")), backend]
    return subprocess.run(
        [*cmd, *program, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def copy_run(src: Path, dst: Path, parts=("world", "sft", "reward")) -> Path:
    """A copy of a run folder's ``parts``, for a test to train on without touching the shared one."""
    import shutil

    for part in parts:
        shutil.copytree(src / part, dst / part)
    return dst


def ppo_config(run_dir, world, **kw):
    """A PPO config small enough for a test: 8 iterations of 6 prompts, 8 new tokens, no checkpoints. ``kw`` as a
    config file would give them (the paper's flags included); dataclass values are taken as their fields."""
    import dataclasses

    from pmrlhf.config import from_dict, merge_sections
    from pmrlhf.stages import ppo
    from pmrlhf.stages.ppo.config import penalty_section

    base = dict(
        run_dir=str(run_dir),
        world=dataclasses.asdict(world),
        iterations=8,
        prompts_per_iteration=6,
        optim={"batch_size": 6},
        max_new_tokens=8,
        checkpoint_every=0,
        data={"portion": "rl", "max_response_tokens": 8},
    )
    as_data = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in kw.items()}
    return from_dict(ppo.PPOConfig, merge_sections(penalty_section(base), penalty_section(as_data)))


def world_comparison(run_dir: Path, name: str, max_new_tokens: int = 8) -> dict:
    """Where the policy that stage ``name`` trained sits among the closed forms over M(x) of the run's world
    (``exact.compare_with_closed_forms`` with the stage's ``objective.json``), the targets' mass outside M(x)
    estimated from responses of up to ``max_new_tokens``."""
    import json

    from pmrlhf.config import ModelConfig
    from pmrlhf.evaluation.exact import compare_with_closed_forms
    from pmrlhf.models import load_causal_lm, load_reward_model, load_tokenizer

    run = Path(run_dir)
    tok = load_tokenizer(run / "sft" / "model")
    policy, reference = (
        load_causal_lm(ModelConfig(), tok, p, trainable=False) for p in (run / name / "model", run / "sft" / "model")
    )
    reward_model = load_reward_model(ModelConfig(), tok, run / "reward" / "model", trainable=False)
    objective = json.loads((run / name / "objective.json").read_text())
    return compare_with_closed_forms(
        policy, reference, reward_model, tok, run / "world", objective, max_new_tokens=max_new_tokens
    )
