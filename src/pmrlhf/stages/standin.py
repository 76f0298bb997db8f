"""A recipe's stand-in: the same pipeline, with the recipe's settings and code paths, where each Hub model is a
tiny untrained one of the same architecture and tokenizer family, the Hub dataset is 40 rows of its format, and
every budget is a few steps. It checks a recipe end to end on a CPU in seconds before it goes to GPUs
(``pmrlhf run RECIPE --stand-in``); its numbers mean nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pmrlhf.config import InputError, merge_sections, to_dict
from pmrlhf.data.sources import iter_rows
from pmrlhf.io import console
from pmrlhf.stages.pipeline import PipelineConfig

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
ROWS = 40
# the budgets of a stand-in: enough to run every code path of a stage once or twice
BUDGETS = {
    "sft": {"optim": {"batch_size": 4}},
    "reward": {"optim": {"batch_size": 4}},
    "ppo": {"iterations": 2, "prompts_per_iteration": 4, "max_new_tokens": 6, "checkpoint_every": 1},
    "dpo": {"optim": {"batch_size": 4}},
    "eval": {"max_new_tokens": 6, "data": {"limit": 4}},
    "probe": {"max_new_tokens": 6, "data": {"limit": 4}},
}


def _words(start: int, step: int, n: int) -> str:
    return " ".join(WORDS[(start * step + k) % len(WORDS)] for k in range(n))


def rows(data_format: str, n: int = ROWS) -> list[dict]:
    """``n`` rows of ``data_format`` (``data.format``) made of a few words: a longer answer is the chosen one."""
    out = []
    for i in range(n):
        good, bad = _words(i, 3, 5) + ".", _words(i, 5, 2) + "."
        if data_format in ("full_hh_rlhf", "hh_rlhf"):
            prompt = f"\n\nHuman: {_words(i, 1, 4)}?\n\nAssistant:"
            if data_format == "hh_rlhf":  # whole dialogues, the prompt inside each
                out.append({"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"})
            else:
                out.append({"prompt": prompt, "response": f" {good}", "chosen": f" {good}", "rejected": f" {bad}"})
        elif data_format == "tldr":
            prompt = f"SUBREDDIT: r/pets\nTITLE: question {i}\nPOST: {_words(i, 7, 20)}\nTL;DR:"
            out.append({"prompt": prompt, "chosen": f"TL;DR: {_words(i, 1, 4)}", "rejected": f"TL;DR: {bad}"})
        elif data_format in ("auto", "comparison", "trl_standard"):
            out.append({"prompt": f"{_words(i, 1, 4)}?", "chosen": good, "rejected": bad})
        else:
            raise InputError(
                f"a stand-in writes rows of the formats full_hh_rlhf, hh_rlhf, tldr and comparison, not "
                f"{data_format!r}: set data.source to a local file of yours"
            )
    return out


def style_of(config) -> str:
    """The tokenizer family of a model's transformers config: OPT's (byte-level BPE, BOS = EOS = ``</s>``, a pad
    token), Llama 2's (SentencePiece-style pieces, ``<s>`` first, no pad token), or else byte-level BPE with a
    start token and no pad token, as Llama 3's."""
    if config.model_type == "opt":
        return "opt"
    return "llama2" if config.model_type == "llama" and config.vocab_size == 32000 else "llama3"


def recipe_tokenizer(style: str, texts: list[str]):
    """A tokenizer of ``style`` (``style_of``) trained on ``texts``, 300 pieces."""
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
    """A tokenizer of ``style`` trained on ``texts`` and an untrained one-layer model of ``arch`` (seeded), saved to
    ``path``; return the path."""
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
    with torch.random.fork_rng():  # the same weights on every run, so a stand-in run again reuses what it trained
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    save_model(model, tok, path)
    return str(path)


def stand_in(config: PipelineConfig) -> PipelineConfig:
    """``config`` with its models, data and budgets replaced as the module says; the stand-in's model and rows
    are written under ``<run_dir>/stand-in/``."""
    from pmrlhf.stages.plan import model_config

    folder = Path(config.run_dir) / "stand-in"
    folder.mkdir(parents=True, exist_ok=True)
    data = to_dict(config.data)
    if Path(data["source"]).is_file():  # the user's own file stays, so its format is checked too
        texts = [json.dumps(row) for row in iter_rows(data["source"])]
    else:
        made = rows(data["format"])
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made))
        data["source"] = str(folder / "data.jsonl")
        texts = [" ".join(r.values()) for r in made]
    models = {}
    for role in ("policy", "reward_model"):
        name = getattr(config, role).name_or_path
        if name not in models:
            hub = model_config(name)
            style = style_of(hub)
            models[name] = tiny_model(folder / f"{hub.model_type}-{style}", hub.model_type, style, texts)
    policy, reward_model = (
        dataclasses.replace(
            getattr(config, role), name_or_path=models[getattr(config, role).name_or_path], dtype="float32"
        )
        for role in ("policy", "reward_model")
    )
    sections = {name: merge_sections(getattr(config, name), budget) for name, budget in BUDGETS.items()}
    console.print(
        f"[yellow]stand-in: {', '.join(models)} replaced by tiny untrained models of their families, the data by "
        f"{data['source']}, each stage cut to a few steps: its numbers say nothing of the recipe's[/yellow]"
    )
    return dataclasses.replace(
        config, data=type(config.data)(**data), policy=policy, reward_model=reward_model, **sections
    )
