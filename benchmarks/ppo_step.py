"""PPO iteration cost against the sum of its bare parts, and throughput against TRL's RLOOTrainer.

    python benchmarks/ppo_step.py [--sizes tiny small] [--iterations 10] [--precision bf16 fp32] [--skip-trl]

For each model size (untrained models of real architectures, built from config; timing does not depend on
the weights) it prints:

* the time of one full PPO iteration (GAE, critic, float32) and the sum of the bare costs of its parts
  measured in the same run at the same batch and lengths: one ``generate``, the reference, reward and critic
  forward passes, and the actor and critic forward+backward passes (target: iteration <= 1.15 x the sum);
* response tokens per second of our stage with ``advantage=rloo`` and of TRL's ``RLOOTrainer`` on the same
  model, prompts, batch size, lengths and KL coefficient, neither with activation checkpointing, and their
  ratio, at each precision: ``bf16`` is mixed precision on both sides, ``fp32`` full precision on both. The
  target (>= 1.5) is on the ``bf16`` ratio: TRL's ``RLOOTrainer`` in its default precision, against ours at the
  same precision. TRL runs twice: on its default kernels (the target's ratio), and given the attention and
  activation kernels ``pmrlhf.models`` loads with, so that the second ratio is the trainers' own work alone.

Both comparisons interleave: each round times one iteration and then each bare part, and one of our RLOO
iterations runs right after each of TRL's steps in the same process. On shared cores, whose speed drifts by
10 % or more within a minute, timing one side after the other moved the ratios more than the changes being
measured.

The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pmrlhf.config import ModelConfig, from_dict, to_dict
from pmrlhf.data.tokenize import pad
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.io import read_jsonl
from pmrlhf.models import attention_implementation, fuse_activations, save_model, tiny_config
from pmrlhf.models.sampling import generate
from pmrlhf.models.scoring import critic_values, join, token_logprobs
from pmrlhf.stages import ppo

SIZES = {"tiny": dict(layers=2, hidden=64, heads=4), "small": dict(layers=6, hidden=256, heads=8)}
BATCH, NEW_TOKENS = 16, 16
KL = 0.1  # both RLOO runs pay for a reference pass: the same KL-regularised objective
WORLD = WorldConfig(n_prompts=64, n_demonstrations=10, n_comparisons=10, n_rankings=10)  # prompts only are used


def build_run(root: Path, size: str) -> Path:
    """A run folder with a world and untrained SFT / reward models of the given size."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    World.generate(WORLD).write(root / "world")
    from pmrlhf.models import load_tokenizer

    tok = load_tokenizer(root / "world" / "tokenizer")
    cfg = tiny_config("gpt2", len(tok), **SIZES[size], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(cfg), tok, root / "sft" / "model")
    cfg.num_labels = 1
    save_model(AutoModelForSequenceClassification.from_config(cfg), tok, root / "reward" / "model")
    return root


def config(run: Path, **kw) -> ppo.PPOConfig:
    base = dict(
        run_dir=str(run),
        world=to_dict(WORLD),
        prompts_per_iteration=BATCH,
        optim={"batch_size": BATCH},
        max_new_tokens=NEW_TOKENS,
        checkpoint_every=0,
        iterations=1_000_000,
    )
    return from_dict(ppo.PPOConfig, {**base, **kw})


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def iteration_vs_parts(run: Path, iterations: int) -> dict[str, float]:
    """Medians over rounds; each round times one iteration and then each bare part once, so that a machine
    whose speed drifts (shared cores) slows both sides of a round alike."""
    trainer = ppo.PPOTrainer(config(run, name="bench-gae"))
    for _ in range(2):
        trainer.step()  # warm-up

    # The bare parts, at one batch of the same prompts and generated lengths.
    tok = trainer.tokenizer
    prompts = [trainer.prompts[i] for i in range(BATCH)]
    actor = trainer.accelerator.unwrap_model(trainer.actor)
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    responses, _ = generate(actor, prompts, tok, NEW_TOKENS, 0.9, 1.0)
    ids, attn, resp = join(prompts, responses, tok.pad_token_id)

    def actor_step():
        token_logprobs(actor, ids, attn, keep=resp).sum().backward()
        actor.zero_grad()

    def critic_step():
        (critic_values(critic, ids, attn) * resp).sum().backward()
        critic.zero_grad()

    parts = {
        "generate": lambda: generate(actor, prompts, tok, NEW_TOKENS, 0.9, 1.0),
        "reference_forward": torch.no_grad()(lambda: token_logprobs(trainer.reference, ids, attn, keep=resp)),
        "reward_forward": torch.no_grad()(lambda: trainer.reward_model(input_ids=ids, attention_mask=attn)),
        "critic_forward": torch.no_grad()(lambda: critic_values(critic, ids, attn)),
        "actor_forward_backward": actor_step,
        "critic_forward_backward": critic_step,
    }
    rounds: list[dict[str, float]] = []
    for _ in range(iterations):
        row = {"iteration": timed(trainer.step, 1)}
        row |= {name: timed(fn, 1) for name, fn in parts.items()}
        rounds.append(row)
    left, left_mask = pad(prompts, tok.pad_token_id, "left")
    hf_generate = timed(
        lambda: actor.generate(
            input_ids=left,
            attention_mask=left_mask,
            do_sample=True,
            top_p=0.9,
            top_k=0,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        iterations,
    )
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = statistics.median(r["iteration"] / sum(r[p] for p in parts) for r in rounds)
    return {
        "iteration_s": median["iteration"],
        "parts_sum_s": sum(median[p] for p in parts),
        "ratio": ratio,
        "hf_generate_s": hf_generate,
        **{f"part/{p}": median[p] for p in parts},
    }


def rloo_throughputs(
    run: Path, iterations: int, k: int, bf16: bool, our_kernels: bool, compiled: bool = False
) -> tuple[dict[str, float], float]:
    """Response tokens per second of our stage with ``advantage=rloo`` (``{"ours": ...}``, and with
    ``compiled`` also ``"ours_compiled"``, the stage with ``compile_sampler``) and of TRL's ``RLOOTrainer``. One
    iteration of each of ours runs right after each of TRL's steps, so that a machine whose speed drifts slows
    all alike.

    TRL runs on its defaults, or (``our_kernels``) given the attention and activation kernels that
    ``pmrlhf.models`` loads with, so that what is left of the ratio is the trainer's own work."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from pmrlhf.models import load_tokenizer

    rloo = dict(
        mixed_precision="bf16" if bf16 else "no",
        advantage="rloo",
        samples_per_prompt=k,
        kl_ctl=KL,
        prompts_per_iteration=BATCH // k,
    )
    ours = {"ours": ppo.PPOTrainer(config(run, name="bench-rloo", **rloo))}
    if compiled:
        ours["ours_compiled"] = ppo.PPOTrainer(config(run, name="bench-rloo-c", compile_sampler=True, **rloo))
    for trainer in ours.values():
        trainer.step()  # warm-up (and the compile)
    tok = load_tokenizer(run / "sft" / "model")
    prompts = [row["prompt"] for row in read_jsonl(run / "world" / "prompts.jsonl")]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts] * 50)
    attention = {"attn_implementation": attention_implementation(ModelConfig())} if our_kernels else {}
    reward_model = AutoModelForSequenceClassification.from_pretrained(run / "reward" / "model", **attention)
    trl_lengths: list[float] = []
    clock = {"trl_s": 0.0, "since": None} | {f"{name}_s": 0.0 for name in ours} | {name: 0.0 for name in ours}

    class Interleave(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if clock["since"] is not None:  # TRL's first step is its warm-up
                clock["trl_s"] += now - clock["since"]
                for name, trainer in ours.items():
                    start = time.perf_counter()
                    row = trainer.step()
                    clock[f"{name}_s"] += time.perf_counter() - start
                    clock[name] += row["env/response_length"] * BATCH  # response tokens
            clock["since"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                trl_lengths.append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as out:
        args = RLOOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            num_generations=k,
            max_completion_length=NEW_TOKENS,
            temperature=1.0,
            top_p=0.9,
            max_steps=iterations + 1,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            beta=KL,
            use_cpu=True,
            learning_rate=1e-4,
            disable_tqdm=True,
            bf16=bf16,
            gradient_checkpointing=False,  # TRL's default has it; ours does not: the same settings on both sides
            model_init_kwargs=attention or None,
        )
        trainer = RLOOTrainer(
            model=str(run / "sft" / "model"),
            reward_funcs=reward_model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            reward_processing_classes=tok,
            callbacks=[Interleave()],
        )
        if our_kernels:
            for model in (trainer.model, trainer.ref_model, reward_model):
                fuse_activations(model)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log line when tqdm is off
            trainer.train()
    # TRL's step i is timed from the end of our step i - 1 to its own end: it includes its logging of step i - 1
    return {name: clock[name] / clock[f"{name}_s"] for name in ours}, sum(trl_lengths[1:]) * BATCH / clock["trl_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt for the RLOO comparison")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["bf16", "fp32"],
        choices=["bf16", "fp32"],
        help="bf16: mixed precision on both sides (TRL's default); fp32: full precision on both",
    )
    parser.add_argument("--skip-trl", action="store_true", help="only the iteration against its parts")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run(Path(tmp), size)
            r = iteration_vs_parts(run, args.iterations)
            print(
                f"[{size}] one PPO iteration {r['iteration_s'] * 1e3:.1f} ms; "
                f"bare parts {r['parts_sum_s'] * 1e3:.1f} ms; ratio {r['ratio']:.3f} (target <= 1.15)"
            )
            for k, v in r.items():
                if k.startswith("part/"):
                    print(f"    {k[5:]:<24} {v * 1e3:8.1f} ms")
            print(f"    {'(HF model.generate)':<24} {r['hf_generate_s'] * 1e3:8.1f} ms")
            for precision in [] if args.skip_trl else args.precision:
                bf16 = precision == "bf16"
                mine, trl = rloo_throughputs(run, args.iterations, args.group, bf16, False, compiled=True)
                again, same = rloo_throughputs(run, args.iterations, args.group, bf16, our_kernels=True)
                ours, ours_again, compiled = mine["ours"], again["ours"], mine["ours_compiled"]
                r[f"ours_rloo_tokens_per_s/{precision}"] = ours
                r[f"trl_rloo_tokens_per_s/{precision}"] = trl
                r[f"throughput_ratio/{precision}"] = ours / trl
                r[f"ours_compiled_sampler_rloo_tokens_per_s/{precision}"] = compiled
                r[f"throughput_ratio_compiled_sampler/{precision}"] = compiled / trl
                r[f"trl_our_kernels_rloo_tokens_per_s/{precision}"] = same
                r[f"throughput_ratio_same_kernels/{precision}"] = ours_again / same
                target = "target >= 1.5" if bf16 else "TRL's default is bf16: no target"
                print(
                    f"[{size}] RLOO response tokens/s, {precision}: ours {ours:.0f}, TRL {trl:.0f}, "
                    f"ratio {ours / trl:.2f} ({target}); with compile_sampler {compiled:.0f}, ratio "
                    f"{compiled / trl:.2f}; ours {ours_again:.0f}, TRL on our kernels {same:.0f}, ratio "
                    f"{ours_again / same:.2f}"
                )
            results[size] = r
    print(json.dumps(results))


if __name__ == "__main__":
    main()
