import subprocess
import sys

import pytest
import torch

from pmrlhf.config import ModelConfig
from pmrlhf.data.tokenize import Encoder, word_tokenizer
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.models import (
    TINY_ARCHS,
    Critic,
    attention_for_passes,
    load_causal_lm,
    load_reward_model,
    save_model,
    tiny_config,
    train_without_dropout,
)
from pmrlhf.models.scoring import join, reward_scores, sequence_logprobs, token_logprobs


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(World.generate(WorldConfig(n_prompts=4)).vocabulary())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_models_load_back_with_plain_transformers(tmp_path, tok, arch):
    cfg = ModelConfig(tiny_arch=arch)
    torch.manual_seed(0)
    lm, rm = load_causal_lm(cfg, tok), load_reward_model(cfg, tok)
    save_model(lm, tok, tmp_path / "lm")
    save_model(rm, tok, tmp_path / "rm")
    ids = tok("q1 : w3 w2", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want_lm = lm(torch.tensor([ids])).logits[0, -1, :5].tolist()
        want_rm = rm(torch.tensor([ids])).logits[0, 0].item()
    # A fresh interpreter that never imports pmrlhf.
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
assert "pmrlhf" not in sys.modules
tok = AutoTokenizer.from_pretrained({str(tmp_path / "lm")!r})
ids = torch.tensor([tok("q1 : w3 w2", add_special_tokens=False)["input_ids"]])
lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / "lm")!r})
rm = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "rm")!r})
print(lm(ids).logits[0, -1, :5].tolist(), rm(ids).logits[0, 0].item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    got_lm, got_rm = out.rsplit("] ", 1)
    torch.testing.assert_close(torch.tensor(eval(got_lm + "]")), torch.tensor(want_lm), atol=1e-5, rtol=0)
    assert abs(float(got_rm) - want_rm) < 1e-5


def test_gelu_new_runs_as_one_kernel_with_the_same_outputs_and_saved_config(tmp_path, tok):
    """GPT-2's gelu_new is swapped for PyTorch's tanh GELU at load: the same logits, the config unchanged."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(), tok).eval()
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert any(isinstance(m, PytorchGELUTanh) for m in model.modules())
    assert model.config.activation_function == "gelu_new"
    save_model(model, tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # plain transformers: gelu_new
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    ids = torch.randint(3, len(tok), (4, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_attention_is_eager_on_cpu_unless_asked_otherwise_or_the_passes_are_long(tok):
    assert load_causal_lm(ModelConfig(), tok).config._attn_implementation == "eager"
    sdpa = load_reward_model(ModelConfig(attn_implementation="sdpa"), tok)
    assert sdpa.config._attn_implementation == "sdpa"
    assert attention_for_passes(ModelConfig(), 64, 96).attn_implementation == "auto"  # 0.6 M: eager
    assert attention_for_passes(ModelConfig(), 64, 160).attn_implementation == "sdpa"  # 1.6 M
    assert attention_for_passes(ModelConfig(attn_implementation="eager"), 64, 288).attn_implementation == "eager"


def test_ppo_loads_its_models_with_the_attention_its_passes_call_for(trained, tmp_path, tiny_world_config, monkeypatch):
    from helpers import copy_run, ppo_config
    from pmrlhf import models
    from pmrlhf.stages import ppo

    run = copy_run(trained, tmp_path / "run")
    config = ppo_config(run, tiny_world_config, advantage="gae")
    assert ppo.PPOTrainer(config).actor_module.config._attn_implementation == "eager"
    monkeypatch.setattr(models, "EAGER_LIMIT", 0)  # every pass counts as long
    trainer = ppo.PPOTrainer(config)
    roles = (trainer.actor_module, trainer.reference, trainer.reward_model, trainer.critic.model)
    assert {m.config._attn_implementation for m in roles} == {"sdpa"}


def test_lora_model_is_merged_before_saving(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    lm = load_causal_lm(ModelConfig(lora_r=4, lora_target_modules=["c_attn"]), tok)
    assert sum(p.numel() for p in lm.parameters() if p.requires_grad) < sum(p.numel() for p in lm.parameters()) / 5
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # make the adapter matter
        want = lm(torch.tensor([[5, 3, 10]])).logits
    save_model(lm, tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(plain(torch.tensor([[5, 3, 10]])).logits, want, atol=1e-5, rtol=0)


def test_critic_values_match_the_reward_score_at_the_last_token(tok):
    torch.manual_seed(0)
    rm = load_reward_model(ModelConfig(), tok)
    critic = Critic(rm)
    ids, attn, _ = join([[5, 3], [6, 3]], [[10, 11, 1], [12, 1]], tok.pad_token_id)  # right-padded
    values = critic(ids, attn)
    assert values.shape == ids.shape
    last = attn.sum(-1) - 1
    torch.testing.assert_close(values[torch.arange(2), last], rm(input_ids=ids, attention_mask=attn).logits[:, 0])


def test_sequence_logprobs_equal_the_sum_of_token_logprobs_and_ignore_padding(tok):
    torch.manual_seed(0)
    lm = load_causal_lm(ModelConfig(), tok).eval()
    prompts, responses = [[5, 3], [6, 3]], [[10, 11, 1], [12, 1]]
    total, length = sequence_logprobs(lm, prompts, responses, tok.pad_token_id)
    assert length.tolist() == [3, 2]
    for i in range(2):
        ids = torch.tensor([prompts[i] + responses[i]])
        alone = token_logprobs(lm, ids, torch.ones_like(ids))[0, len(prompts[i]) :].sum()
        torch.testing.assert_close(total[i], alone, atol=1e-5, rtol=0)
    rm = load_reward_model(ModelConfig(), tok).eval()
    batch = reward_scores(rm, prompts, responses, tok.pad_token_id)
    single = reward_scores(rm, prompts[1:], responses[1:], tok.pad_token_id)
    torch.testing.assert_close(batch[1:], single, atol=1e-5, rtol=0)


def test_encoder_truncates_or_skips_long_prompts_and_counts(tok):
    long_prompt = "w1 " * 10 + "q1 :"
    enc = Encoder(tok, max_prompt_tokens=4, max_response_tokens=3)
    ids = enc.prompt(long_prompt)
    assert tok.convert_ids_to_tokens(ids) == ["w1", "w1", "q1", ":"]  # the end of the prompt is kept
    assert enc.response("w1 w2 w3 w4") == tok.convert_tokens_to_ids(["w1", "w2"]) + [tok.eos_token_id]
    assert enc.counts == {"prompts truncated from the left": 1, "responses cut": 1}
    skip = Encoder(tok, max_prompt_tokens=4, overflow="skip")
    assert skip.prompt(long_prompt) is None and skip.prompt("q1 :") is not None
    assert skip.counts == {"prompts skipped (too long)": 1}


def test_gradient_checkpointing_saves_fewer_activations_and_gives_the_same_gradient(tok):
    ids = torch.tensor([tok("q1 : w3 w2 w1", add_special_tokens=False)["input_ids"]])
    saved, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(ModelConfig(gradient_checkpointing=checkpointing), tok).train()
        assert model.config.use_cache is not checkpointing
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = token_logprobs(model, ids, torch.ones_like(ids)).sum()
        loss.backward()
        saved.append(count[0])
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad.clone())
    assert saved[1] < saved[0] / 2  # the blocks keep only their inputs for the backward pass
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_model_folder_of_the_wrong_kind_is_refused_not_filled_with_random_weights(tmp_path, tok, arch):
    """A frozen reward model from a language model's folder would score with a random head, and a policy from a
    reward model's folder would hold a score head it never uses (Llama's LM head would be random too)."""
    cfg = ModelConfig(tiny_arch=arch)
    save_model(load_causal_lm(cfg, tok), tok, tmp_path / "lm")
    save_model(load_reward_model(cfg, tok), tok, tmp_path / "rm")
    with pytest.raises(ValueError, match=f"{tmp_path / 'lm'} cannot be loaded as a reward model .*without a reward"):
        load_reward_model(cfg, tok, tmp_path / "lm", trainable=False)
    with pytest.raises(ValueError, match=f"{tmp_path / 'rm'} .*not a language model"):
        load_causal_lm(cfg, tok, tmp_path / "rm", trainable=False)
    # the reward stage starts from the SFT model and trains a fresh head: allowed
    assert load_reward_model(cfg, tok, tmp_path / "lm").score.weight.requires_grad
    frozen = load_reward_model(cfg, tok, tmp_path / "rm", trainable=False)
    again = load_reward_model(cfg, tok, tmp_path / "rm", trainable=False)
    assert torch.equal(frozen.score.weight, again.score.weight)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_train_without_dropout_is_training_mode_with_evaluation_arithmetic(tmp_path, tok, arch):
    """A model loaded from a folder comes in evaluation mode, where transformers skips activation checkpointing.
    ``train_without_dropout`` puts it in training mode with every dropout of the architecture at zero, configured
    at 0.5 here: its outputs are those of evaluation mode, pass after pass, and the saved config keeps its dropout."""
    cfg = tiny_config(arch, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rates = [k for k in cfg.to_dict() if ("dropout" in k or "pdrop" in k) and isinstance(getattr(cfg, k), float)]
    assert rates
    for key in rates:
        setattr(cfg, key, 0.5)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    save_model(AutoModelForCausalLM.from_config(cfg), tok, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not model.training
    ids = torch.tensor([tok("q1 : w3 w2 w1", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        evaluation = model(ids).logits
        model.train()
        assert not torch.equal(model(ids).logits, evaluation)  # the configured dropout is real
        train_without_dropout(model)
        assert model.training
        torch.testing.assert_close(model(ids).logits, evaluation, rtol=0, atol=0)
    assert all(getattr(model.config, k) == 0.5 for k in rates)


def test_every_stage_we_train_runs_the_activation_checkpointing_it_is_asked_for(
    trained, tmp_path, tiny_world_config, monkeypatch
):
    """With ``gradient_checkpointing: true`` the SFT, reward, DPO and PPO stages checkpoint their layers, although their
    models load in evaluation mode (on an H200 the Llama-3.2-1B reward and DPO stages peaked 12-13 GiB above the
    plan before they did, 16-17 GiB above what they hold now)."""
    from transformers import modeling_utils

    from helpers import copy_run, ppo_config
    from pmrlhf.config import DataConfig, OptimConfig
    from pmrlhf.stages import dpo, ppo, reward, sft

    calls = []
    real = modeling_utils.checkpoint  # what activation_checkpointing_enable hands the layers
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = copy_run(trained, tmp_path / "run")
    checkpointed = ModelConfig(gradient_checkpointing=True)
    common = dict(run_dir=str(run), world=tiny_world_config, checkpoint_every=0)
    few = dict(data=DataConfig(portion="reward", limit=32), optim=OptimConfig(batch_size=16, epochs=1))
    layers = 2  # the tiny models' layers: each training pass checkpoints every one
    steps = {
        "sft": lambda: sft.run(sft.SFTConfig(name="sft-ckpt", model=checkpointed, **common, **few)),
        "reward": lambda: reward.run(reward.RewardConfig(name="rm-ckpt", model=checkpointed, **common, **few)),
        "dpo": lambda: dpo.run(dpo.DPOConfig(name="dpo-ckpt", model=checkpointed, **common, **few)),
        "ppo": lambda: ppo.run(ppo_config(run, tiny_world_config, name="ppo-ckpt", iterations=1, policy=checkpointed)),
    }
    for stage, run_stage in steps.items():
        calls.clear()
        run_stage()
        assert len(calls) >= layers, stage  # a training pass at least
