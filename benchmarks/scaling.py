"""How one RLOO iteration's cost grows with response length, batch and model size, against TRL's RLOOTrainer.

    python benchmarks/scaling.py [--sizes tiny small llama] [--lengths 16 64 256] [--prompts 8 32]
                                 [--rounds 1] [--precision bf16] [--plot PNG] [--profile]

Over a grid of model size x response length x prompts per iteration (each prompt sampled ``GROUP`` times, the
smallest RLOO group), one iteration of our PPO stage with ``advantage: rloo`` and one step of TRL's
``RLOOTrainer`` run at identical settings: the same untrained model, prompts, batch, lengths, sampling and KL
coefficient, one optimiser step per batch, no activation checkpointing (TRL's default has it; ours does not).
The models are untrained random-weight models of real architectures (timing does not depend on the weights)
over a vocabulary of ``VOCAB`` words, so that a response rarely meets the end-of-sequence token and runs to its
length limit on both sides. For every point it prints:

* response tokens per second of both, and their ratio (target: >= 1.5 in TRL's default precision, bf16);
* our iteration against the sum of its bare parts measured at the same point: one ``generate``, the reference
  and reward forward passes, the actor's forward and backward pass and its AdamW step (target: <= 1.15);
* the peak memory an iteration adds to what is held between iterations, for both (on a CPU the C heap's bytes
  in use, on a GPU allocated memory);
* our iteration's shares of time in generation, scoring and training;
* the model FLOPs utilisation of both: the FLOPs of the iteration, counted from the model's shapes (generation,
  the frozen reference and reward passes, and the actor's forward and backward pass, causal attention
  included), per second, as a share of the peak matrix-multiply throughput measured in the same run with a
  large ``torch.mm`` in the iteration's precision.

Each point interleaves: every round times one TRL step, then one of our iterations, then each bare part, so that
a machine whose speed drifts (shared cores) slows every side alike. Each side first runs a warm-up, then one
iteration watched for memory and left untimed: the thread that reads a CPU's heap every millisecond slowed the
iterations it watched up to twofold (two cores, both busy with OpenMP threads).

It then fits, per model and trainer, seconds per iteration = c0 + c1 * B * L + c2 * B * L^2 (B sequences, L
new tokens), prints the attention-like quadratic share at the longest point and how time per token grows from
the middle length to the longest, draws the measured points and the fits (``--plot``), and ends with one JSON
line holding every figure, the grid's minimum ratio to TRL and its maximum overhead over bare parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rloo_point import (
    GROUP,
    PROMPT_WORDS,
    VOCAB,
    build_run,
    machine,
    measure_point,
    peak_matmul,
    quiet,
    run_trl,
    shapes,
    stage_config,
    with_flops,
)

from pmrlhf.models import tiny_config
from pmrlhf.stages import ppo

SIZES = {
    "tiny": ("gpt2", dict(layers=2, hidden=64, heads=4)),
    "small": ("gpt2", dict(layers=6, hidden=256, heads=8)),
    "llama": ("llama", dict(layers=4, hidden=512, heads=8)),  # 24 M parameters, 16 M of them in its layers
}


# --- where the time goes ---------------------------------------------------------------------------------------


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}


def profile_summary(prof) -> dict:
    """Where a profiled iteration's time went: the share in matrix multiplies and the FLOP/s they ran at, the share
    in attention kernels, and the ops that took most time (self time, so nothing counts twice)."""
    cuda = torch.cuda.is_available()
    self_time = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6  # noqa: E731
    events = [e for e in prof.key_averages() if self_time(e) > 0]
    total = sum(map(self_time, events))
    matmul = [e for e in events if e.key in MATMULS]
    attention = [e for e in events if "scaled_dot_product" in e.key or "flash" in e.key or "softmax" in e.key]
    matmul_s = sum(map(self_time, matmul))
    top = sorted(events, key=self_time, reverse=True)[:8]
    return {
        "seconds": total,
        "matmul_share": matmul_s / total,
        "matmul_flops_per_s": sum(e.flops for e in matmul) / max(matmul_s, 1e-9),
        "attention_share": sum(map(self_time, attention)) / total,
        "top": {e.key: self_time(e) / total for e in top},
    }


def profile_point(run: Path, new_tokens: int, prompts: int, bf16: bool) -> dict:
    """One of our iterations and one TRL step at a point, each after a warm-up, under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trainer = ppo.PPOTrainer(stage_config(run, new_tokens, prompts, bf16))
    trainer.step()
    with profile(activities=activities, with_flops=True) as ours:
        trainer.step()
    theirs = profile(activities=activities, with_flops=True)

    class Watch(TrainerCallback):  # TRL's second step
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                theirs.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                theirs.__exit__(None, None, None)

    run_trl(run, new_tokens, prompts, bf16, 2, Watch())
    return {"ours": profile_summary(ours), "trl": profile_summary(theirs)}


# --- the cost curve --------------------------------------------------------------------------------------------


def fit(points: list[dict], side: str) -> dict[str, float]:
    """Least squares of seconds per iteration = c0 + c1 * B * L + c2 * B * L^2 over a model's points."""
    x = torch.tensor(
        [
            [1.0, p["sequences"] * p[f"{side}_response_length"], p["sequences"] * p[f"{side}_response_length"] ** 2]
            for p in points
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([p[f"{side}_s"] for p in points], dtype=torch.float64)
    c = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    longest = max(points, key=lambda p: (p["new_tokens"], p["sequences"]))
    b, n = longest["sequences"], longest[f"{side}_response_length"]
    return {
        "c0": c[0],
        "c1": c[1],
        "c2": c[2],
        "quadratic_share_at_longest": c[2] * b * n**2 / (c[0] + c[1] * b * n + c[2] * b * n**2),
    }


def growth(points: list[dict], side: str) -> dict[int, float]:
    """Per batch: how time per response token grows from the middle length to the longest (1: linear)."""
    lengths = sorted({p["new_tokens"] for p in points})
    out = {}
    for b in sorted({p["sequences"] for p in points}):
        at = {p["new_tokens"]: p for p in points if p["sequences"] == b}
        mid, top = at[lengths[len(lengths) // 2]], at[lengths[-1]]
        per_token = lambda p: p[f"{side}_s"] / p[f"{side}_response_length"]  # noqa: E731
        out[b] = per_token(top) / per_token(mid)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (size, r) in zip(axes[0], results.items(), strict=True):
        batches = sorted({p["sequences"] for p in r["points"]})
        for colour, b in zip(("tab:blue", "tab:orange", "tab:green"), batches, strict=False):
            pts = sorted((p for p in r["points"] if p["sequences"] == b), key=lambda p: p["new_tokens"])
            for side, style, label in (("ours", "-", "pmrlhf"), ("trl", "--", "TRL RLOOTrainer")):
                xs = [p[f"{side}_response_length"] for p in pts]
                ax.plot(xs, [p[f"{side}_s"] for p in pts], "o", color=colour, mfc="none" if side == "trl" else colour)
                c = r["fit"][side]
                grid = torch.linspace(min(xs), max(xs), 50).tolist()
                ax.plot(
                    grid,
                    [c["c0"] + c["c1"] * b * n + c["c2"] * b * n**2 for n in grid],
                    style,
                    color=colour,
                    label=f"{label}, {b} sequences",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        lengths = sorted({p["new_tokens"] for p in r["points"]})
        ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("new tokens per sequence")
        ax.set_ylabel("seconds per iteration")
        ax.set_title(f"{size} ({r['shapes']['parameters'] / 1e6:.1f} M parameters)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("One RLOO iteration: points measured, lines fitted (c0 + c1 BL + c2 BL²)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_grid(args, bf16: bool, peak: float) -> dict:
    """``--profile``: at every point, where our iteration's and TRL's step's time goes (``profile_point``)."""
    out = {}
    for size in args.sizes:
        arch, shape = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run(
                Path(tmp), tiny_config(arch, VOCAB, **shape, max_positions=PROMPT_WORDS + max(args.lengths) + 8)
            )
            for prompts in args.prompts:
                for new_tokens in args.lengths:
                    p = profile_point(run, new_tokens, prompts, bf16)
                    out[f"{size}-{new_tokens}-{prompts * GROUP}"] = p
                    for side, r in p.items():
                        top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["top"].items())[:5])
                        print(
                            f"{size:<6} {new_tokens:>4} {prompts * GROUP:>3} {side:<4} {r['seconds']:6.2f} s: matmul "
                            f"{r['matmul_share']:.0%} at {r['matmul_flops_per_s'] / peak:.0%} of peak, attention "
                            f"{r['attention_share']:.0%}; {top}",
                            flush=True,
                        )
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 256], help="new tokens per sequence")
    parser.add_argument("--prompts", nargs="+", type=int, default=[8, 32], help="prompts per iteration")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per point at least, after a warm-up")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 is TRL's default")
    parser.add_argument("--plot", type=Path, default=None, help="where to draw the cost curve (PNG)")
    parser.add_argument("--profile", action="store_true", help="instead of timing, profile each point: where time goes")
    args = parser.parse_args(argv)
    quiet()
    bf16 = args.precision == "bf16"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = machine(device, bf16)
    peak = peak_matmul(torch.bfloat16 if bf16 else torch.float32, device)
    print(f"{where['device']}; {where['precision']} on {where['kernels']}; peak torch.mm {peak / 1e9:.0f} GFLOP/s")
    header = (
        f"{'size':<6} {'L':>4} {'B':>3} | {'ours tok/s':>10} {'TRL tok/s':>9} {'ratio':>5} | {'/ parts':>7} | "
        f"{'ours MiB':>8} {'TRL MiB':>7} | {'gen':>4} {'score':>5} {'train':>5} | {'MFU ours':>8} {'TRL':>5}"
    )
    if args.profile:
        return profile_grid(args, bf16, peak)
    print(header)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for size in args.sizes:
        arch, shape = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            config = tiny_config(arch, VOCAB, **shape, max_positions=PROMPT_WORDS + max(args.lengths) + 8)
            run, s = build_run(Path(tmp), config), shapes(config)
            points = []
            for prompts in args.prompts:
                for new_tokens in args.lengths:
                    p = with_flops(measure_point(run, new_tokens, prompts, args.rounds, bf16), s, PROMPT_WORDS, peak)
                    points.append(p)
                    sh = p["shares"]
                    print(
                        f"{size:<6} {new_tokens:>4} {p['sequences']:>3} | {p['ours_tokens_per_s']:>10.0f} "
                        f"{p['trl_tokens_per_s']:>9.0f} {p['ratio']:>5.2f} | {p['overhead']:>7.3f} | "
                        f"{p['ours_peak_bytes'] / 2**20:>8.0f} {p['trl_peak_bytes'] / 2**20:>7.0f} | "
                        f"{sh['generate']:>4.0%} {sh['score']:>5.0%} {sh['train']:>5.0%} | "
                        f"{p['ours_mfu']:>8.1%} {p['trl_mfu']:>5.1%}",
                        flush=True,
                    )
        results[size] = {"shapes": s, "points": points, "fit": {side: fit(points, side) for side in ("ours", "trl")}}
        results[size]["growth"] = {side: growth(points, side) for side in ("ours", "trl")}
    print("\nCost curve, seconds per iteration = c0 + c1 B L + c2 B L^2 (B sequences, L new tokens):")
    for size, r in results.items():
        for side in ("ours", "trl"):
            c, g = r["fit"][side], r["growth"][side]
            print(
                f"  {size:<6} {side:<4} c0 {c['c0']:.3g} s, c1 {c['c1']:.3g} s, c2 {c['c2']:.3g} s; quadratic share "
                f"at the longest point {c['quadratic_share_at_longest']:.0%}; time per token from "
                f"{args.lengths[len(args.lengths) // 2]} to {args.lengths[-1]} new tokens x "
                + ", ".join(f"{v:.2f} ({b} seq.)" for b, v in g.items())
            )
    if args.plot:
        plot(results, args.plot)
        print(f"cost curve: {args.plot}")
    all_points = [p for r in results.values() for p in r["points"]]
    summary = {
        **where,
        "peak_flops": peak,
        "min_ratio_to_trl": min(p["ratio"] for p in all_points),
        "max_overhead_over_bare_parts": max(p["overhead"] for p in all_points),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
