"""Peak memory of the actor's token log-probabilities, forward and backward, at Llama-3's vocabulary (128256):
``models.scoring.token_logprobs`` (chunked) against the naive full-vocabulary float32 form.

    python benchmarks/memory.py [--batch 4] [--tokens 512]

Each form runs in a process of its own on an untrained tiny Llama (one layer, width 64: the vocabulary's
logits dominate, as they do in the actor's step of a real model) and reports how far its resident memory rose
above what the model and batch already held (the peak resident set size, ``ru_maxrss``; the rise includes the
weights' gradients, 63 MiB). Target: the chunked
form's rise at most a third of the naive one's. The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB = 128_256
TARGET = 1 / 3


def rise(form: str, batch: int, tokens: int) -> float:
    """MiB the resident memory rose above the model's and batch's during one forward and backward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from pmrlhf.models import tiny_config
    from pmrlhf.models.scoring import token_logprobs

    torch.manual_seed(0)
    cfg = tiny_config("llama", VOCAB, layers=1, hidden=64, heads=4, max_positions=tokens, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(1, VOCAB, (batch, tokens))
    attn = torch.ones_like(ids)
    if form == "naive":

        def logprobs():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    else:

        def logprobs():
            return token_logprobs(model, ids, attn)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logprobs().sum().backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--form", choices=("naive", "chunked"), help=argparse.SUPPRESS)  # one process per form
    args = parser.parse_args()
    if args.form:
        print(rise(args.form, args.batch, args.tokens))
        return
    results = {"vocab": VOCAB, "batch": args.batch, "tokens": args.tokens}
    for form in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--form", form, "--batch", str(args.batch), "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[f"{form}_mib"] = float(out.strip().splitlines()[-1])
    full = VOCAB * args.batch * (args.tokens - 1) * 4 / 2**20
    results["ratio"] = results["chunked_mib"] / results["naive_mib"]
    print(f"float32 logits of the batch: {full:.0f} MiB")
    print(
        f"peak rise, forward + backward: naive {results['naive_mib']:.0f} MiB, chunked {results['chunked_mib']:.0f} MiB"
    )
    print(f"ratio {results['ratio']:.2f} (target <= {TARGET:.2f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
