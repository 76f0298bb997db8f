"""The GPU check: every stage of the recipes on random-weight models of their real shapes, and a PPO iteration's
speed at 512 new tokens against TRL's RLOOTrainer. Nothing is downloaded.

    python benchmarks/gpu_check.py [--out runs/gpu-check]    # on a CUDA GPU (make gpu-check)
    python benchmarks/gpu_check.py --tiny                     # the same steps at a tiny size, on a CPU

For each recipe in ``RECIPES`` it builds a model of the recipe's architecture from the config ``pmrlhf plan`` knows
(``stages.plan.KNOWN_CONFIGS``: OPT-1.3B, Llama-3.2-1B) with random weights and a word tokenizer of the model's
whole vocabulary, writes a data file of the recipe's format whose prompts and responses run past the recipe's
length limits, and runs the recipe's pipeline with its own single-GPU settings (bf16 weights, activation
checkpointing, its batch sizes and lengths) for a few steps of each stage: SFT, the reward model, PPO with KL and
with the prefix rule, PM-DPO, evaluation and the probe. It prints, per stage, whether every logged loss is finite,
the peak GPU memory allocated against ``pmrlhf plan``'s estimate for one GPU, and the stage's time. Then it
measures one RLOO iteration of the Llama-3.2-1B shape at 512 new tokens, ours against TRL's ``RLOOTrainer``
(``rloo_point.measure_point``): tokens per second, the ratio, peak memory, and the model FLOPs utilisation against
the GPU's peak ``torch.mm``. With several GPUs visible it also runs the Llama recipe under FSDP and DeepSpeed
ZeRO-2 (``accelerate launch``) and reports whether each finished.

``--tiny`` shrinks every model to two narrow layers and a 512-word vocabulary, the lengths to a few tokens, and
runs on the CPU in float32: the check's code runs in the test suite, so it cannot rot.

The last line is a JSON object with every figure; ``--out`` also keeps it as ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rloo_point
import torch
import yaml

from pmrlhf.config import from_dict
from pmrlhf.io import read_jsonl
from pmrlhf.models import save_model
from pmrlhf.stages import pipeline
from pmrlhf.stages.plan import GIB, Launch, model_config, plan_pipeline

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("opt-1.3b-hh", "llama3.2-1b-tldr")
SPEED_MODEL = "meta-llama/Llama-3.2-1B"
SPEED_NEW_TOKENS, SPEED_PROMPTS = 512, 32
TINY_SHAPE = dict(  # every architecture's size keys; each config takes those it has
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    ffn_dim=128,
    word_embed_proj_dim=64,
    vocab_size=512,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def real_config(name: str, tiny: bool):
    """The transformers config of ``name`` as ``pmrlhf plan`` knows it; with ``tiny`` its size keys shrunk."""
    config = model_config(name)
    if tiny:
        for key, value in TINY_SHAPE.items():
            if hasattr(config, key):
                setattr(config, key, value)
    return config


def write_model(path: Path, name: str, tiny: bool) -> str:
    """Random weights of ``name``'s shape and a word tokenizer of its whole vocabulary, saved in bf16 (float32
    with ``tiny``): the recipe loads policy and reward model from this one folder, as it does from the Hub's."""
    from transformers import AutoModelForCausalLM

    config = real_config(name, tiny)
    tok = rloo_point.word_tokenizer(config.vocab_size)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if tiny else torch.bfloat16)
    save_model(model, tok, path)
    return str(path)


def data_rows(fmt: str, n: int, vocab: int, prompt_words: int, response_words: int) -> list[dict]:
    """Rows of a recipe's format (hh-rlhf's dialogue, TL;DR's post and summary) made of random words."""
    rng = random.Random(0)
    words = lambda k: " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        if fmt == "full_hh_rlhf":
            prompt = f"\n\nHuman: {words(prompt_words)}?\n\nAssistant:"
            chosen, rejected = " " + words(response_words), " " + words(response_words // 2)
            rows.append({"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected})
        else:
            prompt = f"SUBREDDIT: r/w\nTITLE: {words(8)}\nPOST: {words(prompt_words)}\nTL;DR:"
            rows.append({"prompt": prompt, "chosen": "TL;DR: " + words(response_words), "rejected": words(8)})
    return rows


def check_config(recipe: str, root: Path, tiny: bool) -> dict:
    """The recipe's pipeline config with its Hub model and dataset swapped for local ones, a few steps of each
    stage, and two PPO variants (KL and the prefix rule at the recipe's first beta) and PM-DPO."""
    data = yaml.safe_load((ROOT / "configs" / "recipes" / f"{recipe}.yaml").read_text())
    model = write_model(root / "model", data["policy"]["name_or_path"], tiny)
    lengths = data["data"]
    if tiny:
        lengths |= {"max_prompt_tokens": 48, "max_response_tokens": 12}
    source = root / "data.jsonl"
    rows = data_rows(
        data["data"]["format"],
        400,
        real_config(data["policy"]["name_or_path"], tiny).vocab_size,
        lengths["max_prompt_tokens"] + 16,
        lengths["max_response_tokens"] + 16,
    )
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the word tokenizer lacks the hh-rlhf layout's "Human:" and "Assistant:": the check measures memory and time
    data |= {"run_dir": str(root / "run"), "data": {**data["data"], "source": str(source), "max_unknown_share": 1.0}}
    for role in ("policy", "reward_model"):
        data[role] |= {"name_or_path": model} | ({"dtype": "float32"} if tiny else {})
    steps = 3
    every = {"logging": {"log_every": 1}, "checkpoint_every": 0}
    for stage in ("sft", "reward"):
        data[stage] |= {"data": {"limit": steps * data[stage]["optim"]["batch_size"]}} | every
    data["ppo"] |= {"iterations": 2} | every
    if tiny:
        data["ppo"] |= {"prompts_per_iteration": 8, "max_new_tokens": 8}
    first_kl = next(v for v in data["variants"] if v["penalty"] == "kl")
    prefix = next(v for v in data["variants"] if v["penalty"] == "cpm_prefix" and v["beta"] == first_kl["beta"])
    data["variants"] = [first_kl, prefix]
    data["dpo"] = {
        "optim": {**data["sft"]["optim"], "epochs": 1},
        "data": {"limit": steps * data["sft"]["optim"]["batch_size"]},
    } | every
    data["dpo_variants"] = [{"name": "dpo-pm", "loss": "pm"}]
    for section in ("eval", "probe"):
        data[section] |= {"data": {"limit": 8}} | ({"max_new_tokens": 8} if tiny else {})
    return data


def stage_losses(run: Path, stage: str) -> dict[str, float]:
    """Every logged loss of a stage: its last value, or NaN if any logged value was not finite."""
    path = run / stage / "metrics.jsonl"
    last: dict[str, float] = {}
    for row in read_jsonl(path) if path.is_file() else []:
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)):
                last[key] = value if math.isfinite(value) and math.isfinite(last.get(key, 0.0)) else math.nan
    return last


def memory_now() -> int:
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def peak_since_reset() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def check_recipe(recipe: str, root: Path, tiny: bool) -> dict:
    """Run one recipe's stages (``check_config``); per stage its losses, peak memory, plan and time."""
    data = check_config(recipe, root, tiny)
    config = from_dict(pipeline.PipelineConfig, data)
    plans = plan_pipeline(config, Launch("ddp", 1, "bf16"))
    planned = {p.stage: p.total for p in plans}
    ppo_plan = next(p.total for p in plans if p.stage in [v["name"] for v in data["variants"]])
    stages: dict[str, dict] = {}
    clock = [time.perf_counter()]

    def finished(name: str) -> None:
        peak = peak_since_reset()
        losses = stage_losses(Path(data["run_dir"]), name)
        plan = planned.get(name, ppo_plan if name in [v["name"] for v in data["variants"]] else None)
        stages[name] = {
            "seconds": time.perf_counter() - clock[0],
            "peak_bytes": peak,
            "plan_bytes": plan,
            "losses": losses,
            "finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
        }
        log(f"{recipe} {name}: {describe(stages[name])}")
        stages[name]["held_after_bytes"] = memory_now()
        reset_peak()
        clock[0] = time.perf_counter()

    memory_now()
    reset_peak()
    pipeline.run(config, finished=finished)
    stages["eval+probe"] = {"seconds": time.perf_counter() - clock[0], "peak_bytes": peak_since_reset()}
    log(f"{recipe} eval+probe: {stages['eval+probe']['seconds']:.0f} s, peak {peak_since_reset() / GIB:.1f} GiB")
    return stages


def describe(stage: dict) -> str:
    plan = f"plan {stage['plan_bytes'] / GIB:.1f} GiB" if stage["plan_bytes"] else "no plan"
    losses = ", ".join(f"{k} {v:.4g}" for k, v in stage["losses"].items())
    return (
        f"{'finite' if stage['finite'] else 'NOT FINITE'} ({losses}); peak {stage['peak_bytes'] / GIB:.2f} GiB, "
        f"{plan}; {stage['seconds']:.0f} s"
    )


def check_speed(root: Path, tiny: bool) -> dict:
    """One RLOO iteration of ``SPEED_MODEL``'s shape, ours against TRL (``rloo_point.measure_point``)."""
    config = real_config(SPEED_MODEL, tiny)
    new_tokens, prompts = (8, 4) if tiny else (SPEED_NEW_TOKENS, SPEED_PROMPTS)
    config.max_position_embeddings = max(config.max_position_embeddings, rloo_point.PROMPT_WORDS + new_tokens)
    run = rloo_point.build_run(root, config)
    bf16 = torch.cuda.is_available()
    device = torch.device("cuda" if bf16 else "cpu")
    peak = rloo_point.peak_matmul(torch.bfloat16 if bf16 else torch.float32, device)
    point = rloo_point.measure_point(run, new_tokens, prompts, rounds=1 if tiny else 2, bf16=bf16)
    point = rloo_point.with_flops(point, rloo_point.shapes(config), rloo_point.PROMPT_WORDS, peak)
    log(
        f"RLOO iteration, {SPEED_MODEL} shape, {point['sequences']} sequences x {new_tokens} new tokens: ours "
        f"{point['ours_tokens_per_s']:.0f} tokens/s, TRL {point['trl_tokens_per_s']:.0f}, ratio {point['ratio']:.2f}; "
        f"peak {point['ours_peak_bytes'] / GIB:.1f} / {point['trl_peak_bytes'] / GIB:.1f} GiB; MFU "
        f"{point['ours_mfu']:.1%} / {point['trl_mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s; our time in generation "
        f"{point['shares']['generate']:.0%}"
    )
    return {"peak_flops": peak, **point, **rloo_point.machine(device, bf16)}


def check_sharded(root: Path) -> dict:
    """With several GPUs: the Llama recipe's check config under FSDP and DeepSpeed ZeRO-2, one process per GPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        log(f"{gpus} GPU visible: FSDP and ZeRO-2 not run")
        return {}
    out = {}
    for name, launch in (("fsdp", "fsdp.yaml"), ("zero2", "deepspeed_zero2.yaml")):
        data = check_config("llama3.2-1b-tldr", root / name, tiny=False)
        data["ppo"]["prompts_per_iteration"] = 8 * gpus
        path = root / name / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        start = time.perf_counter()
        done = subprocess.run(
            [
                "accelerate",
                "launch",
                "--config_file",
                str(ROOT / "configs" / "accelerate" / launch),
                "--num_processes",
                str(gpus),
                "-m",
                "pmrlhf",
                "run",
                str(path),
            ],
            capture_output=True,
            text=True,
        )
        out[name] = {"returncode": done.returncode, "seconds": time.perf_counter() - start}
        log(f"{name} on {gpus} GPUs: {'finished' if done.returncode == 0 else done.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the check's code, not its figures")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="folder for runs and results")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--skip-speed", action="store_true", help="only the stages")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible: run on a GPU, or with --tiny")
    rloo_point.quiet()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"tiny": args.tiny, "torch": torch.__version__}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory
        log(f"{result['gpu']}, {memory / GIB:.0f} GiB; torch {torch.__version__}")

    def keep() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    for recipe in args.recipes:
        result[recipe] = check_recipe(recipe, args.out / recipe, args.tiny)
        shutil.rmtree(args.out / recipe)  # a recipe's models take tens of GB; the figures are kept
        keep()
    if not args.skip_speed:
        result["speed"] = check_speed(args.out / "speed", args.tiny)
        keep()
    result["sharded"] = check_sharded(args.out / "sharded")
    keep()
    result["all_finite"] = all(s["finite"] for r in args.recipes for s in result[r].values() if "finite" in s)
    keep()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_finite"] else 1)
