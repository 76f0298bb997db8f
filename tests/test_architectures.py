"""The architectures the recipes name, and the next ones users try, on tiny random-weight configs: the
log-probabilities every stage trains on, computed a chunk of the vocabulary's logits at a time, equal the naive
full-vocabulary form in value and gradient, under every wrapper training puts around a model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pmrlhf.models import TINY_ARCHS, tiny_config
from pmrlhf.models.scoring import HEAD_ONLY, token_logprobs

VOCAB = 301  # odd, so that no chunk of rows divides the batch evenly


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, pad_token_id=0, eos_token_id=1)).train()


def naive(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.pad(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0  # right padding, as the stages join prompt and response
    return ids, attn


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("rows", [1_000_000, 4])  # one chunk; chunks of 4 tokens (9 of them, the last short)
def test_chunked_logprobs_equal_the_naive_form_in_value_and_gradient(arch, rows):
    assert arch in HEAD_ONLY
    model, (ids, attn) = tiny(arch), batch()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    expected = naive(model, ids, attn)
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    got = token_logprobs(model, ids, attn, chunk_bytes=4 * VOCAB * rows)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert dict(model.named_modules()).keys() == dict(tiny(arch).named_modules()).keys()  # the head is back


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("rows", [1_000_000, 2])
def test_kept_positions_alone_are_projected_and_equal_the_naive_form_in_value_and_gradient(arch, rows):
    """A response mask as ``keep``: the head sees only its positions (the prompts' are never projected); there
    the values and every gradient are the naive form's, elsewhere 0, and a row with no kept position is 0."""
    model, (ids, attn) = tiny(arch), batch()
    keep = torch.zeros_like(ids)
    keep[0, 4:], keep[1, 5:8] = 1, 1  # row 1's response ends at its padding; row 2 has none
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    expected = naive(model, ids, attn) * keep
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    projected = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: projected.append(i[0].shape[0]))
    got = token_logprobs(model, ids, attn, keep=keep, chunk_bytes=4 * VOCAB * rows)
    hook.remove()
    (got * weights).sum().backward()
    assert sum(projected) == keep.sum()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_batch_with_nothing_to_keep_still_trains_to_zero_gradients():
    model, (ids, attn) = tiny("llama"), batch()
    got = token_logprobs(model, ids, attn, keep=torch.zeros_like(ids))
    got.sum().backward()
    assert torch.equal(got, torch.zeros_like(got, dtype=torch.float32))
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_one_chunk_is_the_naive_form_bit_for_bit():
    """Where a batch's logits fit in one chunk (every run of the synthetic world), nothing changes at all."""
    model, (ids, attn) = tiny("gpt2"), batch()
    with torch.no_grad():
        assert torch.equal(token_logprobs(model, ids, attn), naive(model, ids, attn))


def test_chunked_logprobs_under_lora_and_bf16_autocast():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, task_type="CAUSAL_LM"))
    ids, attn = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = naive(model, ids, attn)
        got = token_logprobs(model, ids, attn, chunk_bytes=4 * VOCAB * 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_architecture_with_a_transform_after_its_head_is_scored_the_naive_way():
    """Gemma-2 soft-caps its logits after the output embedding: swapping that embedding would skip the cap."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids, attn = batch()
    assert cfg.model_type not in HEAD_ONLY
    keep = torch.ones_like(ids)
    keep[:, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, ids, attn), naive(model, ids, attn), rtol=0, atol=0)
        torch.testing.assert_close(token_logprobs(model, ids, attn, keep), naive(model, ids, attn) * keep)


def distinct_parameters(*models) -> int:
    """Elements of every distinct parameter tensor the models hold between them (shared ones counted once)."""
    seen = {}
    for model in models:
        for p in model.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_lora_ppo_holds_one_copy_of_each_base_and_its_frozen_roles_stay_the_base(trained, tmp_path, tiny_world_config):
    """With LoRA on the policy and the reward model, the reference is the actor's base with the adapter off and
    the reward model the critic's: the parameters held are one base of each plus adapters. After updates that
    move the adapters, the frozen roles still score as the SFT and reward models loaded on their own do."""
    from helpers import copy_run, ppo_config
    from pmrlhf.config import ModelConfig
    from pmrlhf.models import WithoutAdapter, load_causal_lm, load_reward_model
    from pmrlhf.models.scoring import join, token_logprobs
    from pmrlhf.stages import ppo

    run = copy_run(trained, tmp_path / "run")
    lora = {"lora_r": 4, "lora_target_modules": ["c_attn"]}
    trainer = ppo.PPOTrainer(ppo_config(run, tiny_world_config, policy=lora, reward=lora, optim={"lr": 3e-2}))
    assert isinstance(trainer.reference, WithoutAdapter) and isinstance(trainer.reward_model, WithoutAdapter)
    sft = load_causal_lm(ModelConfig(), trainer.tokenizer, run / "sft" / "model", trainable=False)
    rm = load_reward_model(ModelConfig(), trainer.tokenizer, run / "reward" / "model", trainable=False)
    adapters = sum(p.numel() for n, p in trainer.actor_module.named_parameters() if "lora_" in n)
    critic_extra = sum(
        p.numel() for n, p in trainer.critic.named_parameters() if "lora_" in n or "modules_to_save" in n
    )
    held = distinct_parameters(trainer.actor_module, trainer.reference, trainer.reward_model, trainer.critic)
    assert held == distinct_parameters(sft) + adapters + distinct_parameters(rm) + critic_extra
    for _ in range(2):
        trainer.step()
    prompts = trainer.prompts[:4]
    ids, attn, resp = join(prompts, [[5, 6, 7, 1]] * 4, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        moved = token_logprobs(trainer.actor_module, ids, attn)
        torch.testing.assert_close(token_logprobs(trainer.reference, ids, attn), token_logprobs(sft, ids, attn))
        scores = trainer.reward_model(input_ids=ids, attention_mask=attn).logits
        torch.testing.assert_close(scores, rm(input_ids=ids, attention_mask=attn).logits)
    assert not torch.allclose(moved * resp, token_logprobs(sft, ids, attn) * resp)  # the adapter did move


def test_lora_dpo_takes_its_reference_from_the_policy_base_without_loading_a_copy(
    trained, tmp_path, tiny_world_config, monkeypatch
):
    from helpers import copy_run
    from pmrlhf.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig
    from pmrlhf.io import read_jsonl
    from pmrlhf.stages import dpo

    run = copy_run(trained, tmp_path / "run")
    loads = []
    real = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k.get("trainable", True)) or real(*a, **k))
    common = dict(
        run_dir=str(run),
        world=tiny_world_config,
        data=DataConfig(portion="reward", limit=48),
        checkpoint_every=0,
        optim=OptimConfig(lr=1e-3, epochs=1, batch_size=16),
        logging=LoggingConfig(log_every=1),
    )
    lora = ModelConfig(lora_r=4, lora_target_modules=["c_attn"])
    dpo.run(dpo.DPOConfig(name="lora", model=lora, **common))
    assert loads == [True]  # the policy alone; the two-copy form loads a frozen reference too
    loads.clear()
    dpo.run(dpo.DPOConfig(name="full", **common))
    assert loads == [True, False]
    # at the start the adapted policy is its base, so the first loss is log 2 in both forms
    for name in ("lora", "full"):
        assert next(iter(read_jsonl(run / name / "metrics.jsonl")))["train/loss"] == pytest.approx(0.693147, abs=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_reward_model_reads_its_score_at_the_end_of_sequence_token_in_training_and_in_scoring(arch):
    """With pad = eos (GPT-2, Llama-3, any tokenizer without a pad token) transformers reads a classifier's score
    at the last token that is not the pad token: the one before the end of sequence. Every stage here reads it
    at the last attended token, the end of sequence itself, in training (``reward.score_batch``) and in scoring
    (PPO's ``rollout.score`` and evaluation's ``reward_scores``) alike."""
    from transformers import AutoModelForSequenceClassification

    from pmrlhf.models.scoring import join, reward_scores, sequence_scores
    from pmrlhf.stages.reward import score_batch

    eos = pad = 1
    cfg = tiny_config(arch, VOCAB, pad_token_id=pad, eos_token_id=eos)
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, eos], [12, 13, 14, 15, eos]]
    ids, attn, _ = join(prompts, responses, pad)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
        per_token = model.score(hidden)[..., 0]
        at_eos = per_token[torch.arange(2), attn.sum(-1) - 1]
        read = sequence_scores(model, ids, attn)
        torch.testing.assert_close(read, at_eos)
        before_eos = per_token[torch.arange(2), attn.sum(-1) - 2]
        torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits[:, 0], before_eos)
        trained_on, _ = score_batch(model, [(p, [r], None) for p, r in zip(prompts, responses, strict=True)], pad)
        torch.testing.assert_close(trained_on[:, 0], read)
        torch.testing.assert_close(reward_scores(model, prompts, responses, pad), read)
    assert type(model.score) is torch.nn.Linear  # the head is back


def test_a_response_cut_at_max_new_tokens_has_no_end_of_sequence_and_is_scored_at_its_last_token():
    """Generation that reaches ``max_new_tokens`` leaves the response unfinished: no EOS is added, the reward model
    reads its last token, and PPO's reward for the response sits on that token."""
    from transformers import AutoModelForSequenceClassification

    from pmrlhf.models.sampling import generate
    from pmrlhf.models.scoring import join, sequence_scores
    from pmrlhf.objectives.rl import shape_rewards

    class Tok:
        eos_token_id, pad_token_id = 1, 0

    model = tiny("llama").eval()

    def never_end(module, args, out):
        out.logits[..., Tok.eos_token_id] = -1e9

    model.register_forward_hook(never_end)
    prompts = [[5, 6, 7], [8, 9]]
    responses, logps = generate(model, prompts, Tok, max_new_tokens=4, top_p=1.0, temperature=1.0)
    assert [len(r) for r in responses] == [4, 4] and all(Tok.eos_token_id not in r for r in responses)
    assert [len(lp) for lp in logps] == [4, 4]
    cfg = tiny_config("llama", VOCAB, pad_token_id=0, eos_token_id=1)
    cfg.num_labels = 1
    reward_model = AutoModelForSequenceClassification.from_config(cfg).eval()
    ids, attn, resp = join(prompts, responses, Tok.pad_token_id)
    with torch.no_grad():
        per_token = reward_model.score(reward_model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state)
        last = attn.sum(-1) - 1
        scores = sequence_scores(reward_model, ids, attn)
    torch.testing.assert_close(scores, per_token[torch.arange(2), last, 0])
    rewards = shape_rewards(scores, torch.zeros(resp.shape), resp, 1.0, 1.0, 5.0)
    assert torch.equal(rewards.nonzero()[:, 1], last)
    torch.testing.assert_close(rewards[torch.arange(2), last], scores.clamp(-5, 5))
