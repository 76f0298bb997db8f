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
import contextlib
import ctypes
import io
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pmrlhf.config import from_dict
from pmrlhf.models import save_model, tiny_config
from pmrlhf.models.sampling import generate
from pmrlhf.models.scoring import join, token_logprobs
from pmrlhf.stages import ppo
from pmrlhf.training.setup import cpu_has_native_bf16, frozen_autocast

SIZES = {
    "tiny": ("gpt2", dict(layers=2, hidden=64, heads=4)),
    "small": ("gpt2", dict(layers=6, hidden=256, heads=8)),
    "llama": ("llama", dict(layers=4, hidden=512, heads=8)),  # 24 M parameters, 16 M of them in its layers
}
VOCAB = 8192
PROMPT_WORDS = 32
GROUP = 2  # samples per prompt
KL = 0.1  # both sides pay for a reference pass: the same KL-regularised objective
N_PROMPTS = 256
TIMED_SECONDS, MAX_ROUNDS = 2.0, 6  # a point's timed rounds: enough for this many seconds of ours, at most this many


# --- the run folder --------------------------------------------------------------------------------------------


def word_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer of ``vocab`` entries: text decoded from tokens encodes back to the same tokens,
    so TRL's reward model (which reads decoded text) scores the responses as sampled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    words = {w: i for i, w in enumerate([*specials, *(f"w{i}" for i in range(vocab - len(specials)))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def write_prompts(root: Path, vocab: int, n: int = N_PROMPTS, words: int = PROMPT_WORDS) -> Path:
    """``prompts.jsonl``: ``n`` prompts of ``words`` random words of the word tokenizer."""
    rng = random.Random(0)
    rows = [{"prompt": " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(words))} for _ in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "prompts.jsonl"


def build_run(root: Path, config, dtype: torch.dtype = torch.float32) -> Path:
    """A run folder with prompts (``write_prompts``) and untrained SFT and reward models of the transformers
    ``config`` (its vocabulary the word tokenizer's), built on the GPU where there is one and saved in ``dtype``;
    the reward model is the SFT model's body with a score head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = word_tokenizer(config.vocab_size)
    write_prompts(root, len(tok))
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with device:
        save_model(AutoModelForCausalLM.from_config(config, dtype=dtype), tok, root / "sft" / "model")
        config.num_labels = 1
        save_model(AutoModelForSequenceClassification.from_config(config, dtype=dtype), tok, root / "reward" / "model")
    return root


def stage_config(run: Path, new_tokens: int, prompts: int, bf16: bool) -> ppo.PPOConfig:
    sequences = prompts * GROUP
    return from_dict(
        ppo.PPOConfig,
        dict(
            run_dir=str(run),
            name=f"scaling-{new_tokens}-{prompts}",
            data={"source": str(run / "prompts.jsonl"), "format": "prompt", "portion": "all", "eval_fraction": 0.0},
            prompts_per_iteration=prompts,
            samples_per_prompt=GROUP,
            advantage="rloo",
            kl_ctl=KL,
            optim={"batch_size": sequences, "epochs": 1},
            max_new_tokens=new_tokens,
            top_p=1.0,
            temperature=1.0,
            mixed_precision="bf16" if bf16 else "no",
            checkpoint_every=0,
            iterations=1_000_000,
        ),
    )


# --- what is measured --------------------------------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _MallInfo(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ]


def _heap_bytes() -> int:
    """Bytes the C heap has handed out and not taken back (glibc's ``mallinfo2``: its arenas and its mapped
    blocks), where PyTorch's CPU tensors live: unlike resident memory it falls when a tensor is freed."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo


class PeakMemory:
    """The most memory a block of work adds to what was held when it began: allocated memory on a GPU; on a CPU
    the C heap's bytes in use (``_heap_bytes``), read every millisecond by a thread."""

    def __enter__(self):
        self.peak = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.running = _heap_bytes(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _heap_bytes() - self.base)

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, _heap_bytes() - self.base)
            time.sleep(0.001)


def shapes(config) -> dict[str, int]:
    """What the FLOP count needs of a transformers config: layers, attention width, vocabulary and the
    parameters of the layers (every weight matrix outside the embeddings and the output head)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p is not head)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": config.num_hidden_layers,
        "width": heads * head_dim,
        "vocab": head.shape[0],
        "hidden": head.shape[1],
        "body": body,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def iteration_flops(s: dict[str, int], sequences: int, prompt: float, new: float) -> dict[str, float]:
    """Model FLOPs of one RLOO iteration (2 per multiply-add): a forward pass costs 2 x the layers' parameters per
    token, 2 x hidden x vocabulary per token whose logits are used, and 4 x layers x width x the number of keys a
    token attends to (causal: positions 1..S), so 2 x layers x width x S^2 per sequence; a backward pass costs
    twice its forward. Generation makes logits for the new tokens only; the reward model has no vocabulary head."""
    total = prompt + new
    attention = 2 * s["layers"] * s["width"] * total**2
    body, head = 2 * s["body"] * total, 2 * s["hidden"] * s["vocab"]
    full = body + head * total + attention
    return {
        "generation": sequences * (body + head * new + attention),
        "reference": sequences * full,
        "reward": sequences * (body + attention),
        "training": sequences * 3 * full,
    }


def peak_matmul(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the best of a few large square matrix products in ``dtype`` on ``device``."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        synchronize()
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        synchronize()
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best


def machine(device: torch.device, bf16: bool) -> dict[str, str]:
    """Which processor and which precision kernels a figure comes from."""
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kernels = "bf16 tensor cores" if bf16 else "float32"
    else:
        name = platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError):
            info = Path("/proc/cpuinfo").read_text().splitlines()
            get = lambda key: next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(key)), "?")  # noqa: E731
            name = f"{get('model name')} (family {get('cpu family')}), {torch.get_num_threads()} threads"
        kernels = ("native bf16" if cpu_has_native_bf16() else "EMULATED bf16 (slow)") if bf16 else "float32"
    return {"device": name, "precision": "bf16 mixed" if bf16 else "float32", "kernels": kernels}


# --- one point of the grid -------------------------------------------------------------------------------------


def bare_parts(trainer: ppo.PPOTrainer) -> dict:
    """The iteration's parts as bare calls, at one batch of the trainer's prompts and lengths."""
    c, acc = trainer.config, trainer.accelerator
    tok, actor = trainer.tokenizer, trainer.actor_module
    prompts = [p for p in trainer.prompts[: c.prompts_per_iteration] for _ in range(c.samples_per_prompt)]
    sample = lambda: generate(actor, prompts, tok, c.max_new_tokens, c.top_p, c.temperature)  # noqa: E731
    with frozen_autocast(acc):
        responses, _ = sample()
    ids, attn, resp = (t.to(acc.device) for t in join(prompts, responses, tok.pad_token_id))

    def frozen(fn):
        def run():
            with torch.no_grad(), frozen_autocast(acc):
                fn()

        return run

    def actor_step():
        with acc.autocast():
            loss = (token_logprobs(trainer.actor, ids, attn) * resp).sum() / resp.sum()
        loss.backward()

    def optimiser_step():
        trainer.actor_opt.step()
        trainer.actor_opt.zero_grad(set_to_none=True)

    return {
        "generate": frozen(sample),
        "reference_forward": frozen(lambda: token_logprobs(trainer.reference, ids, attn)),
        "reward_forward": frozen(lambda: trainer.reward_model(input_ids=ids, attention_mask=attn)),
        "actor_forward_backward": actor_step,
        "optimiser_step": optimiser_step,
    }


def timed(fn) -> float:
    synchronize()
    t = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t


def run_trl(run: Path, new_tokens: int, prompts: int, bf16: bool, steps: int, callback) -> None:
    """TRL's ``RLOOTrainer`` at ``stage_config``'s settings for ``steps`` steps, with a ``TrainerCallback``."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer

    from pmrlhf.io import read_jsonl
    from pmrlhf.models import load_tokenizer

    tok = load_tokenizer(run / "sft" / "model")
    dataset = Dataset.from_list(list(read_jsonl(run / "prompts.jsonl")))
    reward_model = AutoModelForSequenceClassification.from_pretrained(run / "reward" / "model")
    with tempfile.TemporaryDirectory() as out:
        args = RLOOConfig(
            output_dir=out,
            per_device_train_batch_size=prompts * GROUP,
            num_generations=GROUP,
            max_completion_length=new_tokens,
            temperature=1.0,
            top_p=1.0,
            max_steps=steps,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            beta=KL,
            use_cpu=not torch.cuda.is_available(),
            learning_rate=1e-6,
            disable_tqdm=True,
            bf16=bf16,
            gradient_checkpointing=False,  # TRL's default is on; ours is off (the same settings on both sides)
        )
        trainer = RLOOTrainer(
            model=str(run / "sft" / "model"),
            reward_funcs=reward_model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            reward_processing_classes=tok,
            callbacks=[callback],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log line when tqdm is off
            trainer.train()


def measure_point(run: Path, new_tokens: int, prompts: int, rounds: int, bf16: bool) -> dict:
    """Ours against TRL at one point: ``rounds`` timed rounds (more where an iteration is short) after a warm-up,
    interleaved (module docstring)."""
    from transformers import TrainerCallback

    sequences = prompts * GROUP
    trainer = ppo.PPOTrainer(stage_config(run, new_tokens, prompts, bf16))
    parts = bare_parts(trainer)
    warm_up = timed(trainer.step)
    # short iterations get more rounds: at least TIMED_SECONDS of ours timed, at most MAX_ROUNDS rounds
    rounds = max(rounds, min(MAX_ROUNDS, math.ceil(TIMED_SECONDS / warm_up)))
    with PeakMemory() as our_memory:  # untimed: on a CPU the memory thread would slow what it watches
        trainer.step()
    their_memory = PeakMemory()
    ours: list[dict] = []
    theirs: list[dict] = []
    since: list[float] = []

    class Interleave(TrainerCallback):
        """TRL's first step warms up and its second is watched for memory; each later one is timed, and one of our
        iterations and each bare part follow it."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                their_memory.__enter__()

        def on_step_end(self, args, state, control, **kw):
            synchronize()
            now = time.perf_counter()
            if state.global_step == 2:
                their_memory.__exit__(None, None, None)
            if state.global_step > 2:
                theirs.append({"seconds": now - since[-1]})
                row: dict = {}
                seconds = timed(lambda: row.update(trainer.step()))
                ours.append({"seconds": seconds, **row, "parts": {name: timed(fn) for name, fn in parts.items()}})
            since.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and state.global_step > 2:
                theirs[-1]["response_length"] = logs["completions/mean_length"]

    run_trl(run, new_tokens, prompts, bf16, rounds + 2, Interleave())

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    our_len, their_len = median(ours, "env/response_length"), median(theirs, "response_length")
    our_tps = statistics.median(r["env/response_length"] * sequences / r["seconds"] for r in ours)
    their_tps = statistics.median(r["response_length"] * sequences / r["seconds"] for r in theirs)
    part_sums = [sum(r["parts"].values()) for r in ours]
    phases = {k: median(ours, f"time/{k}") for k in ("generate", "score", "train")}
    return {
        "new_tokens": new_tokens,
        "prompts": prompts,
        "sequences": sequences,
        "ours_tokens_per_s": our_tps,
        "trl_tokens_per_s": their_tps,
        "ratio": our_tps / their_tps,
        "ours_s": median(ours, "seconds"),
        "trl_s": median(theirs, "seconds"),
        "ours_response_length": our_len,
        "trl_response_length": their_len,
        "parts_s": statistics.median(part_sums),
        "overhead": statistics.median(r["seconds"] / s for r, s in zip(ours, part_sums, strict=True)),
        "parts": {k: statistics.median(r["parts"][k] for r in ours) for k in ours[0]["parts"]},
        "ours_peak_bytes": our_memory.peak,
        "trl_peak_bytes": their_memory.peak,
        "shares": {k: v / sum(phases.values()) for k, v in phases.items()},
    }


def with_flops(point: dict, s: dict[str, int], prompt_tokens: float, peak: float) -> dict:
    """The point's FLOPs per iteration (at each side's mean response length) and utilisation of ``peak``."""
    for side in ("ours", "trl"):
        flops = sum(iteration_flops(s, point["sequences"], prompt_tokens, point[f"{side}_response_length"]).values())
        point[f"{side}_flops"] = flops
        point[f"{side}_mfu"] = flops / point[f"{side}_s"] / peak
    return point


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


def quiet() -> None:
    """No progress bars or deprecation notices from the libraries between the benchmark's lines."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


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
