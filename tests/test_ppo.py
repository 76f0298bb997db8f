import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import copy_run, model_weights, ppo_config, torchrun, world_comparison
from pmrlhf.config import ConfigError, ModelConfig, from_dict
from pmrlhf.io import read_jsonl
from pmrlhf.models import TINY_ARCHS
from pmrlhf.models.sampling import generate
from pmrlhf.stages import ppo, reward, sft
from pmrlhf.stages.ppo import rollout
from pmrlhf.training.setup import frozen_autocast


def ppo_settings(**data) -> ppo.PPOConfig:
    """``PPOConfig`` as a config file with these keys gives it."""
    return from_dict(ppo.PPOConfig, data)


def test_paper_flags_map_one_to_one():
    c = ppo_settings(penalty="kl", kl_ctl=0.1)
    assert (c.penalty.name, c.penalty.coefficient(), c.penalty.kwargs()) == ("kl", 0.1, {})
    c = ppo_settings(penalty="entropy", ent_ctl=0.5, alpha_ctl=0.3)
    assert (c.penalty.name, c.penalty.coefficient(), c.penalty.kwargs()) == ("cpm_token", 0.5, {"alpha": 0.3})
    c = ppo_settings(penalty="entropy", ent_ctl=1.0, alpha_ctl=0.0)
    assert (c.penalty.name, c.penalty.coefficient(), c.penalty.kwargs()) == ("pm", 1.0, {})
    # the flag of the other family is unused, as in the reference code, which has both
    c = ppo_settings(penalty="pm", kl_ctl=0.3, ent_ctl=2.0)
    assert (c.penalty.name, c.penalty.coefficient()) == ("pm", 2.0)
    assert ppo_settings(penalty={"name": "kl", "coef": 0.3}) == ppo_settings(penalty="kl", kl_ctl=0.3)
    # without a coefficient, each family's default: kl_ctl 0.1, ent_ctl 1
    assert ppo_settings(penalty="kl").penalty.coefficient() == 0.1
    assert ppo_settings(penalty={"name": "maxent"}).penalty.coefficient() == 1.0
    with pytest.raises(ConfigError, match="kl_ctl and penalty.coef are the same setting"):
        ppo_settings(penalty={"name": "kl", "coef": 0.3}, kl_ctl=0.1)
    with pytest.raises(ConfigError, match="actor_lr is now optim.lr; target_kl is now adaptive_kl.target"):
        ppo_settings(actor_lr=1e-4, target_kl=1.0)
    with pytest.raises(ValueError, match="unknown penalty"):
        ppo_settings(penalty="nope").validate()
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ppo_settings(advantage="rloo").validate()


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"kl_estimator": "k3"}, "as a reward is not a KL penalty"),
        ({"kl_estimator": "k2"}, "as a reward is not a KL penalty"),
        ({"kl_estimator": "k1", "placement": "loss"}, "zero expected gradient"),
        ({"name": "pm", "placement": "loss"}, "for penalty kl"),
        ({"placement": "advantage"}, "penalty.placement must be one of"),
        ({"kl_estimator": "k4"}, "penalty.kl_estimator must be one of"),
        ({"name": "cpm_token", "alpha": 0}, r"penalty.alpha must be in \(0, 1\]"),
    ],
)
def test_combinations_that_optimise_no_stated_objective_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ppo_settings(penalty=kw).validate()
    ppo_settings(penalty={"kl_estimator": "k3", "placement": "loss"}).validate()


@pytest.mark.parametrize(
    "kw",
    [
        {
            "penalty": {"kl_estimator": "k3", "placement": "loss"},
            "adaptive_kl": {"target": 0.5},
            "normalize_reward": True,
        },
        {"penalty": {"kl_estimator": "k2", "placement": "loss"}, "advantage": "rloo", "samples_per_prompt": 2},
        {"penalty": "pm", "optim": {"epochs": 2, "batch_size": 3}, "loss_normalization": "token_mean"},
        {"penalty": "cpm_token", "alpha_ctl": 0.3, "ptx_coef": 0.5, "ema_decay": 0.9},
        {"penalty": "cpm_sequence", "alpha_ctl": 0.01, "advantage": "rloo", "samples_per_prompt": 2},
        {"penalty": "kl", "compile_sampler": True, "mixed_precision": "bf16", "optim": {"epochs": 2}},
        {"penalty": {"name": "maxent", "tau": 0.5}, "advantage": "group_mean", "samples_per_prompt": 3},
        {
            "penalty": "kl",
            "policy": ModelConfig(lora_r=4, lora_target_modules=["c_attn"]),
            "optim": {"lr": 1e-2},
            "compile_sampler": True,
            "ema_decay": 0.5,  # saving the actor once merged its LoRA layers in place, and the EMA found no keys
        },
    ],
)
def test_every_penalty_and_option_trains(trained, tmp_path, tiny_world_config, kw):
    run = copy_run(trained, tmp_path)
    cfg = ppo_config(run, tiny_world_config, iterations=3, **kw)
    path = ppo.run(cfg)
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["losses/policy"]) for r in rows)
    assert all(0.5 < r["policy/ratio"] < 2 and r["policy/ratio_std"] >= 0 for r in rows)
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(path)
    old = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    changed = any(not torch.equal(a, b) for a, b in zip(new.parameters(), old.parameters(), strict=True))
    assert changed
    if kw.get("ema_decay"):
        ema = AutoModelForCausalLM.from_pretrained(run / "ppo" / "model-ema")
        assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), new.parameters(), strict=True))
    objective = json.loads((run / "ppo" / "objective.json").read_text())
    assert objective["method"] == "ppo" and objective["penalty"] == cfg.penalty.name


def test_bf16_mixed_precision_keeps_float32_masters_and_half_frozen_models(trained, tmp_path, tiny_world_config):
    """An fp32 stage first fixes accelerate's shared state in this process; the bf16 stage after it must still
    get its own precision. Trainable weights stay float32 (a bf16 weight would round away Adam's small
    updates); the frozen models are held in bf16; the sampled log-probabilities agree with a float32
    teacher-forced pass to bf16 accuracy."""
    from pmrlhf.models.scoring import join, token_logprobs

    run = copy_run(trained, tmp_path)
    ppo.PPOTrainer(ppo_config(run, tiny_world_config, name="fp32"))
    trainer = ppo.PPOTrainer(ppo_config(run, tiny_world_config, name="bf16", mixed_precision="bf16"))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.actor.parameters()} | {p.dtype for p in trainer.critic.parameters()} == {
        torch.float32
    }
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.reward_model.parameters()} == {torch.bfloat16}
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    row = trainer.step()
    assert all(math.isfinite(v) for v in row.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.actor.parameters(), strict=True))

    prompts = [trainer.prompts[i] for i in range(6)]
    with frozen_autocast(trainer.accelerator):
        responses, logps = generate(trainer.actor, prompts, trainer.tokenizer, 8, 1.0, 1.0)
    ids, attn, resp = join(prompts, responses, trainer.tokenizer.pad_token_id)
    actor = trainer.accelerator.unwrap_model(trainer.actor, keep_fp32_wrapper=False)  # drops the autocast
    with torch.no_grad():
        exact = token_logprobs(actor, ids, attn)[resp.bool()]
    sampled = torch.tensor([x for lp in logps for x in lp])
    assert 0 < (sampled - exact).abs().max() < 0.1  # bf16 rounding: present, and small


def test_ema_of_bf16_weights_is_kept_in_float32(trained, tmp_path, tiny_world_config):
    """With bf16 weights (as DeepSpeed's bf16 engine holds them) a bf16 average would round 0.99 w0 + 0.01 w1 back
    to w0 for most weights; the EMA keeps it exactly, in float32."""
    run = copy_run(trained, tmp_path)
    policy = ModelConfig(dtype="bfloat16")
    trainer = ppo.PPOTrainer(
        ppo_config(run, tiny_world_config, policy=policy, mixed_precision="no", ema_decay=0.99, optim={"lr": 1e-3})
    )
    w0 = {k: v.clone() for k, v in trainer.actor.state_dict().items() if v.is_floating_point()}
    assert {v.dtype for v in w0.values()} == {torch.bfloat16}
    trainer.step()
    w1 = trainer.actor.state_dict()
    moved = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert moved
    for k in moved:
        assert trainer.ema.weights[k].dtype == torch.float32
        torch.testing.assert_close(
            trainer.ema.weights[k], 0.99 * w0[k].float() + 0.01 * w1[k].float(), rtol=0, atol=1e-6
        )
    rounded = [k for k in moved if not torch.equal(trainer.ema.weights[k].bfloat16(), trainer.ema.weights[k])]
    assert len(rounded) == len(moved)  # a bf16 average could not have held them


def test_empty_responses_are_scored_not_fatal(trained, tmp_path, tiny_world_config, monkeypatch):
    run = copy_run(trained, tmp_path)
    trainer = ppo.PPOTrainer(ppo_config(run, tiny_world_config))
    eos = trainer.tokenizer.eos_token_id
    monkeypatch.setattr(
        ppo.trainer, "generate", lambda model, prompts, *a, **k: ([[eos] for _ in prompts], [[-0.7] for _ in prompts])
    )
    row = trainer.step()
    assert row["env/empty_responses"] == 1.0 and row["env/response_length"] == 1.0
    assert all(math.isfinite(v) for v in row.values())


@pytest.fixture(scope="module")
def matched(tmp_path_factory, tiny_world_config):
    """SFT and reward models on a world whose reference knows every meaningful answer (q >= 5 %, 2000
    demonstrations), so that the closed forms over M(x) are reachable by sampling."""
    world = dataclasses.replace(tiny_world_config, n_demonstrations=2000, n_comparisons=1500, ref_floor=0.05)
    run = tmp_path_factory.mktemp("matched")
    sft.run(sft.SFTConfig(run_dir=str(run), world=world))
    reward.run(reward.RewardConfig(run_dir=str(run), world=world))
    return run, world


def test_kl_and_conditional_pm_end_at_their_closed_forms(matched):
    """Same budget, same world: KL RLHF (coef 1) ends near ref * e^r; conditional PM (Def. 4.1) with alpha below
    every meaningful answer's reference probability ends near e^r over M(x), far closer than KL RLHF.

    top_p = 1: nucleus sampling never samples the tail, so it biases every objective towards the majority.
    Margins measured over PPO seeds 0-2 on one draw of the SFT and reward models: KL 0.014-0.039 from its
    target (under the token mean seed 1 collapsed one prompt onto one answer, 0.162: docs/ppo.md); conditional
    PM 0.021-0.070 from its own optimum, which is the reward model's PL distribution over M(x) here, against
    KL's 0.353-0.381 from it. Off M(x) the conditional PM optimum keeps the mass the reward model gives
    unnatural text the reference writes, estimated at 0.043 from 256 reference samples per prompt (an estimate
    with heavy tails: another draw of the samples gave 0.09); the runs put 0.09-0.12 there."""
    run, world = matched
    budget = dict(iterations=300, optim={"lr": 3e-4}, top_p=1.0)
    ppo.run(ppo_config(run, world, name="kl", penalty="kl", kl_ctl=1.0, **budget))
    ppo.run(ppo_config(run, world, name="cpm", penalty="cpm_sequence", alpha_ctl=0.01, **budget))
    kl, cpm = world_comparison(run, "kl"), world_comparison(run, "cpm")
    # KL RLHF: at its own (biased) optimum, far from the reward model's preferences.
    assert kl["tv_to_kl_target"] < 0.05 < kl["reference_tv_to_kl_target"]
    assert kl["tv_to_reward_model"] > 0.25
    assert kl["mass_outside_m"] < kl["kl_target_mass_outside_m"] + 0.05
    # Conditional PM: near the reward model's Plackett-Luce distribution over M(x), and off M(x) near what its
    # optimum keeps there (PM without the condition leaves M(x) altogether: see the demo's report).
    assert cpm["tv_to_own_target"] < 0.1
    assert cpm["tv_to_reward_model"] < min(0.2, kl["tv_to_reward_model"] - 0.15)
    assert cpm["pm_divergence_uniform_pairs"] < kl["pm_divergence_uniform_pairs"] / 2
    assert cpm["mass_outside_m"] < cpm["own_target_mass_outside_m"] + 0.15
    # Solved exactly, Def. 4.1 with alpha below every answer of M(x) is the reward model's PL distribution there
    # (no score reaches the clip): its optimum's PM divergence is 0; KL RLHF's optimum keeps the reference's bias.
    assert cpm.get("clipped_share_over_m", 0.0) == 0.0
    assert cpm["own_target_pm_divergence_uniform_pairs"] < 1e-9
    assert kl["own_target_pm_divergence_uniform_pairs"] > 0.1


def test_off_m_estimate_of_a_flat_reward_is_the_reference_mass_off_m(matched):
    """With every score equal, KL RLHF's optimum is the reference itself, so the sampled estimate of its mass
    outside M(x) must reproduce the reference's exact (teacher-forced) mass outside M(x)."""
    from pmrlhf.config import ModelConfig
    from pmrlhf.evaluation.exact import compare_with_closed_forms
    from pmrlhf.models import load_causal_lm, load_reward_model, load_tokenizer

    run, _ = matched
    tok = load_tokenizer(run / "sft" / "model")
    reference = load_causal_lm(ModelConfig(), tok, run / "sft" / "model", trainable=False)
    flat = load_reward_model(ModelConfig(), tok, run / "reward" / "model", trainable=False)
    torch.nn.init.zeros_(flat.score.weight)
    objective = {"method": "ppo", "penalty": "cpm_sequence", "coef": 1.0, "alpha": 0.01, "beta": 1.0}
    out = compare_with_closed_forms(
        reference, reference, flat, tok, run / "world", objective, max_new_tokens=8, reference_samples=2048
    )
    assert out["reference_mass_outside_m"] > 0.005  # something to estimate
    assert out["kl_target_mass_outside_m"] == pytest.approx(out["reference_mass_outside_m"], abs=0.005)
    # alpha 0 (the paper's switch to unconditional PM): every response is weighed by e^r alone
    pm = compare_with_closed_forms(
        reference, reference, flat, tok, run / "world", objective | {"alpha": 0.0}, max_new_tokens=8
    )
    assert out["reference_mass_outside_m"] < pm["own_target_mass_outside_m"] <= 1


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sampled_logprobs_equal_teacher_forced_logprobs(arch, attention):
    """The KV-cached sampler over left-padded prompts against a plain forward pass over right-padded text; SDPA
    attends over views of the reserved cache, eager attention over the same views."""
    from pmrlhf.config import ModelConfig
    from pmrlhf.data.tokenize import word_tokenizer
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.models import load_causal_lm
    from pmrlhf.models.sampling import generate
    from pmrlhf.models.scoring import join, token_logprobs

    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4)).vocabulary())
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(tiny_arch=arch, attn_implementation=attention), tok).eval()
    prompts = [[5, 3], [7, 9, 10, 3], [6, 3]]  # different lengths: left padding matters
    responses, logps = generate(model, prompts, tok, max_new_tokens=6, top_p=1.0, temperature=1.0)
    ids, attn, resp = join(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        forced = token_logprobs(model, ids, attn)
    for i, lp in enumerate(logps):
        torch.testing.assert_close(torch.tensor(lp), forced[i][resp[i].bool()], atol=1e-5, rtol=0)
    assert all(len(r) == len(lp) for r, lp in zip(responses, logps, strict=True))


def _counted_model():
    """(tokenizer, tiny GPT-2, list that grows by one at every forward pass of the model)."""
    from pmrlhf.config import ModelConfig
    from pmrlhf.data.tokenize import word_tokenizer
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.models import load_causal_lm

    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4)).vocabulary())
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(), tok).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return tok, model, calls


def test_sampler_runs_one_forward_pass_per_new_token():
    """The prompt pass gives the first token and each later token one cached pass; none whose logits go unused."""
    from pmrlhf.models.sampling import generate

    tok, model, calls = _counted_model()
    responses, _ = generate(model, [[5, 3], [7, 9, 10, 3]], tok, max_new_tokens=5, top_p=1.0, temperature=1.0)
    assert max(len(r) for r in responses) == 5  # one response ran to the limit
    assert len(calls) == 5


def test_draw_follows_each_row_and_never_draws_an_impossible_index():
    """200,000 draws per row: every count within 5 standard deviations of its expectation, zeros never drawn."""
    from pmrlhf.models.sampling import draw

    probs = torch.tensor(
        [[0.1, 0.0, 0.6, 0.3, 0.0], [1e-3, 0.0, 0.0, 0.0, 0.999], [0.2] * 5, [0.0, 0.0, 0.0, 0.0, 1.0]]
    ).float()
    n = 200_000
    torch.manual_seed(0)
    drawn = draw(probs.repeat(n, 1)).view(n, len(probs))
    counts = torch.nn.functional.one_hot(drawn, 5).sum(0).double()
    expected = n * probs.double()
    assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - probs.double())).sqrt())
    assert torch.all(counts[probs == 0] == 0)
    torch.manual_seed(1)
    again = draw(probs.repeat(250, 1))
    torch.manual_seed(1)
    assert torch.equal(draw(probs.repeat(250, 1)), again)  # a seed fixes the draws


def test_the_reserved_cache_returns_what_concatenation_would_without_moving():
    """Keys and values after a prompt and three single-token steps equal their concatenation, and every step
    reads the same buffer: nothing is copied but the new token's states."""
    from pmrlhf.models.sampling import _ReservedLayer

    layer, g = _ReservedLayer(positions=9), torch.Generator().manual_seed(0)
    steps = [torch.randn(2, 3, n, 4, generator=g) for n in (6, 1, 1, 1)]
    for i, k in enumerate(steps):
        keys, values = layer.update(k, -k)
        assert torch.equal(keys, torch.cat(steps[: i + 1], -2)) and torch.equal(values, -keys)
        assert keys.data_ptr() == layer.buffers[0].data_ptr() and layer.get_seq_length() == keys.shape[-2]


def test_sampler_projects_onto_the_vocabulary_only_the_positions_it_samples_from():
    """The prompt pass, as every later pass, projects its last position only (transformers' ``logits_to_keep``)."""
    from pmrlhf.models.sampling import generate

    tok, model, _ = _counted_model()
    positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: positions.append(i[0].shape[1]))
    generate(model, [[5, 3], [7, 9, 10, 3]], tok, max_new_tokens=3, top_p=1.0, temperature=1.0)
    assert positions and set(positions) == {1}


def test_sampler_stops_when_told_every_process_is_done():
    """Under sharded parameters every process must decode until all are done: the stop is the caller's."""
    from pmrlhf.models.sampling import generate

    tok, model, calls = _counted_model()
    prompts = [[5, 3], [7, 9, 10, 3]]
    first, _ = generate(model, prompts, tok, 5, 1.0, 1.0, all_done=lambda done: True)
    assert len(calls) == 1 and [len(r) for r in first] == [1, 1]  # the prompt pass gave one token each
    calls.clear()
    torch.manual_seed(1)
    waited, logps = generate(model, prompts, tok, 5, 1.0, 1.0, all_done=lambda done: False)
    assert len(calls) == 5  # another process was still decoding
    for r, lp in zip(waited, logps, strict=True):  # each response still ends at its own first end token
        assert len(r) == len(lp) and tok.eos_token_id not in r[:-1]


def test_compiled_sampler_draws_what_the_eager_one_draws(trained, tiny_world_config):
    """Same seed, same tokens; log-probabilities equal the teacher-forced ones; a second batch reuses the cache
    from a clean start, and another batch size gets its own."""
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.models.sampling import CompiledDecoding, generate
    from pmrlhf.models.scoring import join, token_logprobs

    tok = load_tokenizer(trained / "sft" / "model")
    model = load_causal_lm(ModelConfig(), tok, path=trained / "sft" / "model", trainable=False)
    prompts = [[5, 3], [7, 9, 10, 3], [4], [6, 8, 3]] * 2  # unequal lengths: left padding
    decoding = CompiledDecoding(model, max_length=4 + 8)
    for batch in (prompts, prompts, prompts[:3]):
        torch.manual_seed(3)
        eager = generate(model, batch, tok, 8, top_p=0.9, temperature=1.0)
        torch.manual_seed(3)
        compiled = generate(model, batch, tok, 8, top_p=0.9, temperature=1.0, decoding=decoding)
        assert compiled[0] == eager[0]
        ids, attn, resp = join(batch, compiled[0], tok.pad_token_id)
        forced = token_logprobs(model, ids, attn)[resp.bool()]
        torch.testing.assert_close(torch.tensor([x for r in compiled[1] for x in r]), forced, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the 12 cache positions"):
        generate(model, [[5, 3, 4, 6, 7]], tok, 8, 1.0, 1.0, decoding=decoding)


SMALL = [
    "--set",
    "prompts_per_iteration=6",
    "--set",
    "optim.batch_size=3",
    "--set",
    "max_new_tokens=8",
]


def _untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock timings, which differ between runs of the same computation."""
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def _launch(args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pmrlhf", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def test_sigkill_and_resume_gives_the_same_weights_and_metrics(trained, tmp_path, tiny_world_config):
    args = ["ppo", "--set", "iterations=12", "--set", "checkpoint_every=3", *SMALL]
    env = {"OMP_NUM_THREADS": "1"}  # thread count fixes the order of float reductions
    straight = copy_run(trained, tmp_path / "straight")
    assert _launch([*args, "--run-dir", str(straight)], env).wait() == 0
    killed = copy_run(trained, tmp_path / "killed")
    proc = _launch([*args, "--run-dir", str(killed), "--set", "logging.log_every=1"], env)
    ckpt = killed / "ppo.partial" / "checkpoints"  # a stage writes there until it finishes
    deadline = time.time() + 120
    while not (ckpt.exists() and any(ckpt.glob("iter-000006"))):
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ppo" / "model").exists()
    assert _launch([*args, "--run-dir", str(killed), "--resume"], env).wait() == 0
    a, b = model_weights(straight / "ppo" / "model"), model_weights(killed / "ppo" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(read_jsonl(straight / "ppo" / "metrics.jsonl")) == _untimed(
        read_jsonl(killed / "ppo" / "metrics.jsonl")
    )


def test_two_processes_train_with_torchrun(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    result = torchrun("ppo", "--run-dir", str(run), "--set", "iterations=4", "--set", "checkpoint_every=2", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run / "ppo" / "model" / "model.safetensors").is_file()
    checkpoint = next((run / "ppo" / "checkpoints").glob("iter-*"))
    # both processes' RNG states are kept for an exact resume
    assert {p.name for p in checkpoint.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}


def test_prompt_stream_is_a_seeded_permutation_per_pass_and_resumes_from_its_position():
    a = rollout.PromptStream(5, seed=3)
    first, second = a.take(5), a.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    b = rollout.PromptStream(5, seed=3)
    b.position = 7  # a resumed stream continues where the checkpoint left it
    assert b.take(3) == second[2:]


def test_gradient_clipping_matches_torch_bit_for_bit():
    from pmrlhf.training.optim import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(64, 64), (7,), (3, 5, 2)]]
    grads = [torch.randn(p.shape, generator=g) * 3 for p in params]
    for p, x in zip(params, grads, strict=True):
        p.grad = x.clone()
    expected = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped = [p.grad for p in params]
    ours = [x.clone() for x in grads]
    norm = clip_grad_norm(ours, 1.0)
    assert norm.item() == expected.item()
    assert norm.item() == pytest.approx(math.sqrt(sum((x.double() ** 2).sum().item() for x in grads)), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ours, clipped, strict=True))
    small = [x / 1000 for x in grads]  # norm below the limit: left as it is
    unchanged = [x.clone() for x in small]
    clip_grad_norm(small, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(small, unchanged, strict=True))


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sharded_training_saves_the_whole_models_and_resumes_exactly(trained, tmp_path, backend):
    """FSDP2 and DeepSpeed ZeRO-2 on two CPU processes: each model steps its own engine, the saved actor, critic and
    EMA are whole (under FSDP gathered from both processes' shards), and a checkpoint holds every shard of the
    models, optimisers and EMA, so resuming from it repeats the run bit for bit."""
    one = [*SMALL, "--set", "iterations=1", "--set", "ema_decay=0.5"]
    sharded, replicated = copy_run(trained, tmp_path / backend), copy_run(trained, tmp_path / "ddp")
    for run, how in ((sharded, backend), (replicated, "ddp")):
        result = torchrun("ppo", "--run-dir", str(run), *one, backend=how)
        assert result.returncode == 0, result.stderr[-3000:]
        if how == backend:  # the actor and the critic on each process
            prepared = {"fsdp": "prepared FSDPCritic", "deepspeed": "prepared DeepSpeedEngine"}[backend]
            assert result.stderr.count(prepared) == {"fsdp": 2, "deepspeed": 4}[backend], result.stderr[-3000:]
    sft = model_weights(trained / "sft" / "model")
    for part in ("model", "critic", "model-ema"):  # one update from the same samples (later ones differ: below)
        a, b = model_weights(sharded / "ppo" / part), model_weights(replicated / "ppo" / part)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    actor, ema = model_weights(sharded / "ppo" / "model"), model_weights(sharded / "ppo" / "model-ema")
    for k in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):  # halfway: decay 0.5, one step
        torch.testing.assert_close(ema[k], (sft[k] + actor[k]) / 2, rtol=0, atol=1e-6)

    # With sharded parameters every process decodes until all are done, which draws more random numbers than
    # DDP, so longer runs are compared with themselves: straight through, then again from the checkpoint.
    run = copy_run(trained, tmp_path / "resumed")
    four = [*SMALL, "--set", "iterations=4", "--set", "checkpoint_every=2", "--set", "ema_decay=0.9"]
    assert torchrun("ppo", "--run-dir", str(run), *four, backend=backend).returncode == 0
    straight = {p: model_weights(run / "ppo" / p) for p in ("model", "model-ema")}
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    result = torchrun("ppo", "--run-dir", str(run), *four, "--resume", backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed ppo at iteration 2" in result.stderr
    for part, weights in straight.items():
        again = model_weights(run / "ppo" / part)
        assert all(torch.equal(weights[k], again[k]) for k in weights), part
    assert _untimed(read_jsonl(run / "ppo" / "metrics.jsonl")) == _untimed(rows)


def test_under_deepspeed_each_model_steps_its_own_engine():
    """accelerator.backward would go to the engine prepared last (the critic's), leaving the actor's unstepped."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pmrlhf.training.optim import optimizer_step

    class Engine:
        def __init__(self):
            self.calls = []

        def backward(self, loss):
            self.calls.append(("backward", loss))

        def step(self):
            self.calls.append("step")

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    actor, critic = Engine(), Engine()
    actor_loss, critic_loss = torch.tensor(1.0), torch.tensor(2.0)
    optimizer_step(accelerator, actor, None, actor_loss, max_grad_norm=1.0)
    optimizer_step(accelerator, critic, None, critic_loss, max_grad_norm=1.0)
    assert actor.calls == [("backward", actor_loss), "step"]
    assert critic.calls == [("backward", critic_loss), "step"]


def test_resume_refuses_another_runs_checkpoint_and_a_fresh_start_moves_old_ones_aside(
    trained, tmp_path, tiny_world_config
):
    """A fresh run in a folder with an earlier run's checkpoints pruned them and a later --resume continued the
    earlier run (another kl_ctl)."""
    run = copy_run(trained, tmp_path)
    short = dict(iterations=4, checkpoint_every=2)
    ppo.run(ppo_config(run, tiny_world_config, kl_ctl=0.1, **short))
    first = sorted(p.name for p in (run / "ppo" / "checkpoints").iterdir())
    ppo.run(ppo_config(run, tiny_world_config, kl_ctl=0.5, **short))
    assert sorted(p.name for p in (run / "ppo" / "checkpoints-replaced-1").iterdir()) == first
    with pytest.raises(ValueError, match=r"belongs to another run: penalty.coef = 0.5 there, 0.1 here"):
        ppo.run(ppo_config(run, tiny_world_config, kl_ctl=0.1, iterations=6, checkpoint_every=2, resume=True))
    ppo.run(ppo_config(run, tiny_world_config, kl_ctl=0.5, iterations=6, checkpoint_every=2, resume=True))
    assert [r["step"] for r in read_jsonl(run / "ppo" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_penalty_with_a_new_hyperparameter_is_one_function_and_one_entry(
    trained, tmp_path, tiny_world_config, monkeypatch
):
    """A penalty registered here, with a hyperparameter no built-in one has, trains from its config section, is
    recorded in objective.json, and evaluation takes its optimum from its entry: ``e^{r / coef + w log pi_ref}``."""
    from pmrlhf.evaluation import exact
    from pmrlhf.objectives import penalties as PEN
    from pmrlhf.stages import evaluate

    def partial_kl(logp, ref_logp, mask, weight):  # PM at weight 0, KL at weight 1
        return torch.where(mask.bool(), logp - weight * ref_logp, 0.0)

    def regularizer(logp, ref_logp, mask, weight):
        return ((logp - weight * ref_logp) * mask).sum(-1)

    monkeypatch.setitem(PEN.PENALTIES, "partial_kl", PEN.PenaltyRule(partial_kl, regularizer, "pm", {"weight": 1.0}))
    run = copy_run(trained, tmp_path)
    section = {"name": "partial_kl", "coef": 0.5, "options": {"weight": 0.25}}
    ppo.run(ppo_config(run, tiny_world_config, iterations=3, penalty=section))
    objective = json.loads((run / "ppo" / "objective.json").read_text())
    assert objective["penalty"] == "partial_kl" and objective["weight"] == 0.25 and objective["coef"] == 0.5

    g = torch.Generator().manual_seed(0)
    tokens = torch.ones(2, 3, 4, dtype=torch.float64)
    ref_tokens = exact.TokensOverM(-torch.rand(2, 3, 4, generator=g, dtype=torch.float64), tokens, tokens[..., 0] > 0)
    r = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ref = ref_tokens.sequences.logp.exp()
    expected = torch.softmax(r / 0.5 + 0.25 * ref.log(), -1)
    torch.testing.assert_close(exact.own_target(objective, r, ref, ref_tokens.mask, ref_tokens), expected)

    evaluate.run_eval(evaluate.EvalConfig(run_dir=str(run), world=tiny_world_config))
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert 0 <= summary["ppo"]["world"]["tv_to_own_target"] <= 1
