"""The real-text world (``world.kind: realtext``): a real model's answers to the project's prompts, labelled by two
groups of labelers whose rewards are functions of the text (``data/realtext.py``).

The model answers every prompt ``responses_per_prompt`` times through its chat template (plain sampling, no
nucleus, at most ``response_tokens`` tokens); each labelled pair is two different answers to one prompt, and its
labeler is drawn from the groups by their shares. The files are those of the synthetic world, in TRL's
conversational format, so every stage reads them as it reads a user's data with ``data.chat_template``:
``comparisons.jsonl``, ``sft.jsonl`` (each prompt's first answer), ``prompts.jsonl``; ``truth.json`` holds every
answer with both groups' rewards. Sampling a world takes minutes, so it is made once per setting and kept in the
cache beside the fetched models; each run folder gets a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from pmrlhf.config import InputError, ModelConfig, read_json
from pmrlhf.data import realtext
from pmrlhf.data.world import WorldConfig, resolve_world, write_jsonl
from pmrlhf.io import atomic_dir, console
from pmrlhf.models.fetch import cache_dir
from pmrlhf.training.setup import seed_everything


def ensure_realtext_world(path: Path, config: WorldConfig) -> Path:
    """The world at ``path``, copied from the cache, which samples it first where it has not got it."""
    path = Path(path)
    if (path / "truth.json").is_file():
        resolve_world(path, config)
        return path
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / "worlds" / key
    if not (cached / "truth.json").is_file():
        atomic_dir(cached, lambda tmp: _sample_world(tmp, config))
    return atomic_dir(path, lambda tmp: shutil.copytree(cached, tmp, dirs_exist_ok=True), replace=False)


def load_truth(path: Path) -> dict:
    """``truth.json``'s real-text part: prompts, every answer, and both groups' rewards of each."""
    return read_json(Path(path) / "truth.json", f"remove {path} for the run to write its world again")["realtext"]


def _sample_world(out: Path, config: WorldConfig) -> None:
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.models.sampling import generate

    config.validate()
    if config.n_prompts > len(realtext.PROMPTS):
        raise InputError(f"world.n_prompts: a realtext world has {len(realtext.PROMPTS)} prompts, asked for more")
    prompts = realtext.PROMPTS[: config.n_prompts]
    tokenizer = load_tokenizer(config.text_model)
    model = load_causal_lm(ModelConfig(name_or_path=config.text_model), tokenizer, trainable=False)
    ids = [_chat_prompt(tokenizer, p) for p in prompts]
    k = config.responses_per_prompt
    seed_everything(config.seed)
    with console.status(f"the real-text world: {config.text_model} answers {len(prompts)} prompts {k} times"):
        responses, _ = generate(model, [x for x in ids for _ in range(k)], tokenizer, config.response_tokens, 1.0, 1.0)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    answers = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
    rewards = [realtext.group_rewards(a) for a in answers]
    g = torch.Generator().manual_seed(config.seed + 1)
    comparisons = [
        row for row in (_comparison(prompts, answers, rewards, config, g) for _ in range(config.n_comparisons)) if row
    ]
    write_jsonl(out / "comparisons.jsonl", comparisons)
    write_jsonl(out / "sft.jsonl", [_row(p, a[0], a[1]) for p, a in zip(prompts, answers, strict=True)])
    write_jsonl(out / "prompts.jsonl", [{"prompt": _user(p)} for p in prompts])
    truth = {
        "prompts": prompts,
        "answers": answers,
        "majority": [r[0] for r in rewards],
        "minority": [r[1] for r in rewards],
        "minority_share": config.minority_share,
        "label_noise": config.label_noise,
    }
    (out / "truth.json").write_text(json.dumps({"config": asdict(config), "prompts": [], "realtext": truth}, indent=1))


def _chat_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template(_user(prompt), add_generation_prompt=True, return_dict=False)


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    assistant = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    return {"prompt": _user(prompt), "chosen": assistant[0], "rejected": assistant[1]}


def _comparison(prompts, answers, rewards, config: WorldConfig, g: torch.Generator) -> dict | None:
    """One labelled pair: a prompt, two different answers to it, a labeler of a group drawn by its share."""
    i = int(torch.randint(len(prompts), (1,), generator=g))
    a, b = torch.randperm(len(answers[i]), generator=g)[:2].tolist()
    if answers[i][a] == answers[i][b] or not answers[i][a] or not answers[i][b]:
        return None  # nothing to compare: fewer comparisons, the same for every run of this seed
    group = 1 if float(torch.rand(1, generator=g)) < config.minority_share else 0
    p = torch.sigmoid(torch.tensor(rewards[i][group][a] - rewards[i][group][b])).item()
    first = float(torch.rand(1, generator=g)) < p
    if float(torch.rand(1, generator=g)) < config.label_noise:
        first = not first
    winner, loser = (a, b) if first else (b, a)
    return _row(prompts[i], answers[i][winner], answers[i][loser])
