"""How our sampler's time per new token grows with the response, against transformers' ``generate``.

    python benchmarks/generation.py [--sizes small llama] [--lengths 64 256] [--prompts 32]

For each model of ``scaling.SIZES`` and each response length, the PPO stage's actor (loaded as the stage loads
it: attention for its passes, bf16 autocast) samples ``prompts`` x ``GROUP`` responses to the length limit with
``models.sampling.generate`` and with transformers' ``generate`` (top-p 1, temperature 1, a fresh dynamic KV
cache), alternately, best of ``--rounds``. It prints milliseconds per new token of both and how much that grows
from the shortest length to the longest; a sampler whose time per token grew faster than transformers' would
be doing more than decoding. It then times drawing one token for each of 64 rows over 8,192 and 128,256
entries, ours (``sampling.draw``) against ``torch.multinomial``. The last line is a JSON object with every
figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from rloo_point import GROUP, PROMPT_WORDS, VOCAB, build_run, quiet, stage_config, timed
from scaling import SIZES

from pmrlhf.data.tokenize import pad
from pmrlhf.models import tiny_config
from pmrlhf.models.sampling import draw, generate
from pmrlhf.stages import ppo


def draw_ms(vocab: int, rows: int = 64, calls: int = 20) -> dict[str, float]:
    """Milliseconds to draw one token for each of ``rows`` distributions over ``vocab`` entries: our
    ``sampling.draw`` against ``torch.multinomial``, which transformers' ``generate`` samples with."""
    probs = torch.softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)), -1)
    out = {}
    for name, fn in (("ours_ms", lambda: draw(probs)), ("multinomial_ms", lambda: torch.multinomial(probs, 1))):
        for _ in range(3):  # the first calls allocate
            fn()
        out[name] = 1e3 * timed(lambda fn=fn: [fn() for _ in range(calls)]) / calls
    return out


def measure(run: Path, new_tokens: int, prompts: int, rounds: int) -> dict[str, float]:
    trainer = ppo.PPOTrainer(stage_config(run, new_tokens, prompts, bf16=True))
    actor, tok, acc = trainer.actor_module, trainer.tokenizer, trainer.accelerator
    batch = [p for p in trainer.prompts[:prompts] for _ in range(GROUP)]
    ids, attn = (t.to(acc.device) for t in pad(batch, tok.pad_token_id, "left"))

    def ours():
        with acc.autocast():
            generate(actor, batch, tok, new_tokens, top_p=1.0, temperature=1.0)

    def theirs():
        actor.eval()
        with torch.no_grad(), acc.autocast():
            actor.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # both run to the limit
                do_sample=True,
                top_p=1.0,
                top_k=0,
                temperature=1.0,
                pad_token_id=tok.pad_token_id,
            )
        actor.train()

    ours()  # warm-up
    theirs()
    best = {"ours": float("inf"), "transformers": float("inf")}
    for _ in range(rounds):  # alternately, so that a machine whose speed drifts slows both alike
        for side, fn in (("ours", ours), ("transformers", theirs)):
            best[side] = min(best[side], timed(fn))
    tokens = len(batch) * new_tokens
    return {f"{side}_ms": 1e3 * s / tokens for side, s in best.items()} | {
        "attention": actor.config._attn_implementation
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "llama"], choices=list(SIZES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256], help="new tokens per sequence")
    parser.add_argument("--prompts", type=int, default=32, help="prompts, each sampled GROUP times")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per point, the best kept")
    args = parser.parse_args(argv)
    quiet()
    results: dict[str, dict] = {}
    for size in args.sizes:
        arch, shape = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            config = tiny_config(arch, VOCAB, **shape, max_positions=PROMPT_WORDS + max(args.lengths) + 8)
            run = build_run(Path(tmp), config)
            points = {n: measure(run, n, args.prompts, args.rounds) for n in args.lengths}
        first, last = points[args.lengths[0]], points[args.lengths[-1]]
        growth = {side: last[f"{side}_ms"] - first[f"{side}_ms"] for side in ("ours", "transformers")}
        results[size] = {"points": points, "growth_ms": growth}
        for n, p in points.items():
            print(
                f"{size:<6} {n:>4} new tokens x {args.prompts * GROUP} sequences ({p['attention']}): ours "
                f"{p['ours_ms']:.3f} ms a token, transformers' generate {p['transformers_ms']:.3f}",
                flush=True,
            )
        print(
            f"{size:<6} growth from {args.lengths[0]} to {args.lengths[-1]} new tokens: ours "
            f"+{growth['ours']:.3f} ms a token, transformers' +{growth['transformers']:.3f}",
            flush=True,
        )
    draws = {vocab: draw_ms(vocab) for vocab in (VOCAB, 128_256)}
    for vocab, d in draws.items():
        print(
            f"one token for each of 64 rows over {vocab} entries: ours {d['ours_ms']:.2f} ms, torch.multinomial "
            f"{d['multinomial_ms']:.2f} ms",
            flush=True,
        )
    print(json.dumps({**results, "draws": draws}))
    return {**results, "draws": draws}


if __name__ == "__main__":
    sys.exit(main() and 0)
