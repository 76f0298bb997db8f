"""Memory at Llama-3's vocabulary (128256): the actor's token log-probabilities, forward and backward,
``models.scoring.token_logprobs`` (chunked) against the naive full-vocabulary float32 form; and what each role of
one PPO iteration holds, with full fine-tuning and with LoRA.

    python benchmarks/memory.py [--batch 4] [--tokens 512]

Each form runs in a process of its own on an untrained tiny Llama (one layer, width 64: the vocabulary's
logits dominate, as they do in the actor's step of a real model) and reports how far its resident memory rose
above what the model and batch already held (the peak resident set size, ``VmHWM``; the rise includes the
weights' gradients, 63 MiB). Target: the chunked form's rise at most a third of the naive one's.

For PPO (GAE, a critic; untrained tiny Llamas of that vocabulary, 2 layers of width 64, as actor and reward
model) it reports, per role, the MiB of weights and optimiser state held after an iteration, and the rise of the
peak resident memory over that first iteration (activations, log-probabilities, gradients, the optimiser's
state), with full fine-tuning and with LoRA on the actor and the critic (where the reference and the reward
model are their bases with the adapter off and hold nothing of their own). The last line is a JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCAB = 128_256
TARGET = 1 / 3


def status_kib(field: str) -> int:
    """``VmHWM`` (the peak resident memory of this process) or ``VmRSS``, in KiB; not ``ru_maxrss``, which
    survives ``exec`` and would start at the launching process's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


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

    before = status_kib("VmHWM")
    logprobs().sum().backward()
    return (status_kib("VmHWM") - before) / 1024


def ppo_roles(lora: bool) -> dict:
    """MiB of weights and optimiser state each role holds after one PPO iteration (gradients live only within an
    update), and the rise of the peak resident memory over that iteration."""
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pmrlhf.config import from_dict
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.models import WithoutAdapter, load_tokenizer, save_model, tiny_config
    from pmrlhf.stages import ppo

    root = Path(tempfile.mkdtemp())
    world = WorldConfig(n_prompts=16, n_demonstrations=10, n_comparisons=10, n_rankings=10)
    World.generate(world).write(root / "world")
    tok = load_tokenizer(root / "world" / "tokenizer")
    cfg = tiny_config(
        "llama", VOCAB, layers=2, hidden=64, heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(cfg), tok, root / "sft" / "model")
    cfg.num_labels = 1
    save_model(AutoModelForSequenceClassification.from_config(cfg), tok, root / "reward" / "model")
    adapter = {"lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"]} if lora else {}
    settings = {
        "run_dir": str(root),
        "world": vars(world),
        "prompts_per_iteration": 8,
        "optim": {"batch_size": 8},
        "max_new_tokens": 32,
        "top_p": 1.0,
        "checkpoint_every": 0,
        "iterations": 10,
        "policy": adapter,
        "reward": adapter,
    }
    trainer = ppo.PPOTrainer(from_dict(ppo.PPOConfig, settings))
    before = status_kib("VmHWM")
    trainer.step()
    rise_mib = (status_kib("VmHWM") - before) / 1024
    optimisers = (trainer.actor_opt, trainer.critic_opt)
    states = {id(t) for o in optimisers for st in o.state.values() for t in st.values() if torch.is_tensor(t)}
    held, seen = {}, set()
    roles = {
        "actor": trainer.actor_module,
        "critic": trainer.critic,
        "reference": trainer.reference,
        "reward": trainer.reward_model,
    }
    for role, model in roles.items():
        mib = lambda n: n / 2**20  # noqa: E731
        params = [p for p in model.parameters() if id(p) not in seen]
        seen |= {id(p) for p in params}
        optimiser_state = [
            t
            for o in optimisers
            for p in params
            for t in o.state.get(p, {}).values()
            if torch.is_tensor(t) and id(t) in states
        ]
        held[role] = {
            "weights_mib": mib(sum(p.numel() * p.element_size() for p in params)),
            "optimiser_mib": mib(sum(t.numel() * t.element_size() for t in optimiser_state)),
            "own_copy": not isinstance(model, WithoutAdapter),
        }
    return {"roles": held, "iteration_rise_mib": rise_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--form", choices=("naive", "chunked", "ppo", "ppo-lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.form in ("ppo", "ppo-lora"):
        print(json.dumps(ppo_roles(args.form == "ppo-lora")))
        return
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
    for form in ("ppo", "ppo-lora"):
        out = subprocess.run([sys.executable, __file__, "--form", form], check=True, capture_output=True, text=True)
        results[form] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{form}: one iteration's peak rise {results[form]['iteration_rise_mib']:.0f} MiB; held per role (MiB):")
        for role, m in results[form]["roles"].items():
            print(
                f"  {role:<9} weights {m['weights_mib']:6.1f}  optimiser {m['optimiser_mib']:6.1f}"
                + ("" if m["own_copy"] else "  (the base of the trained role)")
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
