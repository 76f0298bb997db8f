"""One training step's peak memory on CPU, for ``test_plan.py``: ``python measure_step.py ARCH CHECKPOINTING``.

A tiny model of ARCH (4 layers of width 256, 1000 tokens) takes one AdamW step on the sum of its token
log-probabilities over 8 x 256 tokens, in float32 with eager attention (with activation checkpointing when
CHECKPOINTING is 1); prints how far the peak resident memory rose above what was resident before it, in MiB. Run
it with glibc returning large blocks at once (``MALLOC_MMAP_THRESHOLD_``), so that the resident memory follows
what is allocated, in a process of its own (the peak is a high-water mark over the whole process)."""

import sys

import torch
from transformers import AutoModelForCausalLM

from pmrlhf.models import tiny_config
from pmrlhf.models.scoring import token_logprobs

SIZE = dict(vocab=1000, layers=4, hidden=256, heads=4, batch=8, length=256)


def config(arch: str):
    s = SIZE
    return tiny_config(arch, s["vocab"], s["layers"], s["hidden"], s["heads"], s["length"], 0, 1)


def status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in KiB. Not ``ru_maxrss``: that survives
    ``exec`` and starts at the launching process's peak (the test runner's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def peak_rise(arch: str, checkpointing: bool) -> float:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch), attn_implementation="eager")
    if checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, SIZE["vocab"], (SIZE["batch"], SIZE["length"]))
    before = status_kib("VmRSS")
    token_logprobs(model, ids, torch.ones_like(ids)).sum().backward()
    optimizer.step()
    return (status_kib("VmHWM") - before) / 1024


if __name__ == "__main__":
    print(peak_rise(sys.argv[1], sys.argv[2] == "1"))
