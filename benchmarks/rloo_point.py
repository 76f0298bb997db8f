"""One RLOO iteration of our PPO stage against one step of TRL's ``RLOOTrainer``, at one setting: the run folder
both train from, the interleaved timing, the memory and the FLOPs (``scaling.py`` runs the grid and profiles it,
``gpu_check.py`` one point on a GPU)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from pmrlhf.config import from_dict
from pmrlhf.models import save_model
from pmrlhf.models.sampling import generate
from pmrlhf.models.scoring import join, token_logprobs
from pmrlhf.stages import ppo
from pmrlhf.training.setup import cpu_has_native_bf16, frozen_autocast

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
            loss = token_logprobs(trainer.actor, ids, attn, keep=resp).sum() / resp.sum()
        loss.backward()

    def optimiser_step():
        trainer.actor_opt.step()
        trainer.actor_opt.zero_grad(set_to_none=True)

    return {
        "generate": frozen(sample),
        "reference_forward": frozen(lambda: token_logprobs(trainer.reference, ids, attn, keep=resp)),
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


def quiet() -> None:
    """No progress bars or deprecation notices from the libraries between the benchmark's lines."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
