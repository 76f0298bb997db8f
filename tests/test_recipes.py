"""Every GPU recipe in configs/recipes: loaded, validated, and run end to end with its Hub models swapped for
tiny local ones and its Hub dataset for a small local file of the same format. Only the download is untested."""

import json
from pathlib import Path

import pytest
import yaml

from pmrlhf.config import from_dict
from pmrlhf.stages import pipeline

RECIPES = sorted((Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "tree",
    "why",
    "how",
    "what",
    "is",
    "are",
    "birds",
    "fly",
    "south",
    "winter",
    "warm",
    "cold",
    "food",
]


def hh_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        prompt = f"\n\nHuman: {q}?\n\nAssistant:"
        good = " " + " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(5)) + "."
        bad = " " + " ".join(WORDS[(5 * i + k + 1) % len(WORDS)] for k in range(2)) + "."
        rows.append({"prompt": prompt, "response": good, "chosen": good, "rejected": bad})
    return rows


def tldr_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        post = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(20))
        rows.append(
            {
                "prompt": f"SUBREDDIT: r/pets\nTITLE: question {i}\nPOST: {post}\nTL;DR:",
                "chosen": "TL;DR: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4)),
                "rejected": "TL;DR: " + " ".join(WORDS[(i + k + 9) % len(WORDS)] for k in range(3)),
            }
        )
    return rows


# Each recipe's model family, and a tokenizer trained here that behaves as its real one does.
FAMILY = {"opt": ("opt", "opt"), "llama2": ("llama", "llama2"), "llama3": ("llama", "llama3")}


def recipe_tokenizer(style: str, texts: list[str]):
    """A tokenizer trained on ``texts`` in the manner of a recipe's: ``opt`` (byte-level BPE, a pad token, BOS =
    EOS = ``</s>`` put before every text), ``llama2`` (SentencePiece-style ``▁`` pieces with byte fallback
    alphabet, ``<s>`` before every text, no pad token) or ``llama3`` (byte-level BPE, ``<|begin_of_text|>``
    before every text, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "opt": {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "</s>", "unk_token": "<unk>"},
        "llama2": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    }[style]
    bpe = Tokenizer(models.BPE(unk_token=specials.get("unk_token")))
    if style == "llama2":
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    ordered = list(dict.fromkeys(specials.values()))
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=ordered, initial_alphabet=alphabet)
    )
    bos = specials["bos_token"]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)


def tiny_model(path: Path, arch: str, style: str, texts: list[str]) -> str:
    """A tokenizer of ``style`` (``recipe_tokenizer``) and an untrained tiny model of ``arch``, saved to ``path``."""
    from transformers import AutoModelForCausalLM

    from pmrlhf.models import save_model, tiny_config

    tok = recipe_tokenizer(style, texts)
    cfg = tiny_config(
        arch,
        len(tok),
        layers=1,
        hidden=32,
        heads=2,
        max_positions=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    save_model(AutoModelForCausalLM.from_config(cfg), tok, path)
    return str(path)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_runs_with_tiny_models(recipe, tmp_path):
    data = yaml.safe_load(recipe.read_text())
    config = from_dict(pipeline.PipelineConfig, data)
    stages = config.stage_configs()  # every stage's config is complete and valid
    assert len(config.variants) == 15  # beta in {0.1, 0.5, 1} x (KL, alpha in {0.1, 0.3, 0.5}, cpm_prefix at 0.01)
    assert {v.beta for v in stages.values() if hasattr(v, "beta") and hasattr(v, "penalty")} == {0.1, 0.5, 1.0}
    assert config.data.source in ("Dahoas/full-hh-rlhf", "CarperAI/openai_summarize_comparisons")

    rows = hh_rows(40) if config.data.format == "full_hh_rlhf" else tldr_rows(40)
    local = tmp_path / "data.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    name = config.policy.name_or_path.lower()
    family = "opt" if "opt" in name else "llama2" if "llama-2" in name else "llama3"
    arch, style = FAMILY[family]
    model = tiny_model(tmp_path / "tiny", arch, style, texts)

    data["run_dir"] = str(tmp_path / "run")
    data["data"]["source"] = str(local)
    for role in ("policy", "reward_model"):
        data[role] |= {"name_or_path": model, "dtype": "float32"}
    data["sft"]["optim"] |= {"batch_size": 4}
    data["reward"]["optim"] |= {"batch_size": 4}
    data["ppo"] |= {
        "iterations": 2,
        "prompts_per_iteration": 4,
        "optim": {**data["ppo"]["optim"], "batch_size": 2},
        "max_new_tokens": 6,
        "checkpoint_every": 1,
    }
    for section in ("eval", "probe"):
        data[section] |= {"max_new_tokens": 6, "data": {"limit": 4}}
    report = pipeline.run(from_dict(pipeline.PipelineConfig, data))

    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert len(summary) == 16 and all(m["length"] >= 1 for m in summary.values())
    assert "| ppo-cpm0.3-beta0.5 | 0.5 |" in report.read_text()
    # The recipe's own data handling ran: the 20/40/40 split gave each stage its portion of the 40 rows.
    sft_summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert sft_summary["train_examples"] + sft_summary["eval_examples"] == 8
    # The family's BOS starts every prompt the stages encode, and a tokenizer without a pad token pads with EOS.
    from pmrlhf.data.tokenize import Encoder
    from pmrlhf.models import load_tokenizer

    tok = load_tokenizer(tmp_path / "run" / "sft" / "model")
    assert Encoder(tok).prompt(rows[0]["prompt"])[0] == tok.bos_token_id
    assert (tok.pad_token == tok.eos_token) == (style != "opt")


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_the_families_users_try_next_run_a_recipe_end_to_end(arch, tmp_path):
    """Qwen2 and GPT-NeoX / Pythia (byte-level BPE without BOS, as theirs) through the OPT recipe's pipeline:
    SFT, reward model, PPO with GAE and with RLOO, DPO and PM-DPO, evaluation."""
    data = yaml.safe_load(next(r for r in RECIPES if r.stem.startswith("opt")).read_text())
    rows = hh_rows(40)
    local = tmp_path / "data.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_model(tmp_path / "tiny", arch, "llama3", [r["prompt"] + r["chosen"] + r["rejected"] for r in rows])
    data |= {
        "run_dir": str(tmp_path / "run"),
        "variants": [
            {"name": "ppo-kl", "penalty": "kl", "kl_ctl": 1.0},
            {
                "name": "ppo-cpm-rloo",
                "penalty": "entropy",
                "alpha_ctl": 0.3,
                "advantage": "rloo",
                "samples_per_prompt": 2,
            },
        ],
        "dpo_variants": [{"name": "dpo", "loss": "sigmoid"}, {"name": "dpo-pm", "loss": "pm"}],
    }
    data["data"]["source"] = str(local)
    for role in ("policy", "reward_model"):
        data[role] |= {"name_or_path": model, "dtype": "float32"}
    data["sft"]["optim"] |= {"batch_size": 4}
    data["reward"]["optim"] |= {"batch_size": 4}
    data["ppo"] |= {"iterations": 2, "prompts_per_iteration": 4, "max_new_tokens": 6, "checkpoint_every": 0}
    data["ppo"]["optim"] |= {"batch_size": 4}
    for section in ("eval", "probe"):
        data[section] |= {"max_new_tokens": 6, "data": {"limit": 4}}
    pipeline.run(from_dict(pipeline.PipelineConfig, data))
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(summary) == {"reference (SFT)", "ppo-kl", "ppo-cpm-rloo", "dpo", "dpo-pm"}
    assert all(m["length"] >= 1 for m in summary.values())
    assert json.loads((tmp_path / "run" / "ppo-cpm-rloo" / "objective.json").read_text())["penalty"] == "cpm_token"


@pytest.mark.parametrize("style", ["opt", "llama2", "llama3"])
def test_a_prompt_cut_from_the_left_keeps_its_start_token(style):
    """Every recipe truncates long prompts from the left: the cut keeps the BOS the tokenizer puts first (it was
    added, then cut away) and the prompt's end, in ``max_prompt_tokens`` tokens."""
    from pmrlhf.data.tokenize import Encoder

    texts = [row["prompt"] for row in hh_rows(20)]
    tok = recipe_tokenizer(style, texts)
    long_prompt = " ".join(texts[:3])
    full = Encoder(tok, max_prompt_tokens=10_000).prompt(long_prompt)
    enc = Encoder(tok, max_prompt_tokens=12)
    ids = enc.prompt(long_prompt)
    assert len(full) > 12 and len(ids) == 12
    assert ids[0] == tok.bos_token_id and ids[1:] == full[-11:]
    assert enc.counts == {"prompts truncated from the left": 1}
