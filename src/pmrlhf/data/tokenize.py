"""Turning records into token ids: prompt truncation or skipping (counted), response cut, end-of-sequence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from pmrlhf.config import DataConfig


@dataclass
class Encoder:
    """Encode prompts and responses the same way in every stage.

    Prompts longer than ``max_prompt_tokens`` are cut from the left (keeping the end, which the response
    follows) or skipped, per ``overflow``; responses are cut to ``max_response_tokens`` and end with EOS.
    ``counts`` records what happened, for the run's report.
    """

    tokenizer: object
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    overflow: str = "truncate_left"
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.overflow not in ("truncate_left", "skip"):
            raise ValueError(f"prompt_overflow must be 'truncate_left' or 'skip', got {self.overflow!r}")

    @classmethod
    def from_data(cls, tokenizer, data: DataConfig) -> Encoder:
        """The encoder a stage's data section asks for."""
        return cls(tokenizer, data.max_prompt_tokens, data.max_response_tokens, data.prompt_overflow)

    def prompts(self, texts) -> list[list[int]]:
        """Every prompt that fits, encoded; skipped ones are left out (and counted)."""
        return [ids for ids in (self.prompt(t) for t in texts) if ids is not None]

    def prompt(self, text: str) -> list[int] | None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = [bos] + ids
        if len(ids) > self.max_prompt_tokens:
            if self.overflow == "skip":
                self.counts["prompts skipped (too long)"] += 1
                return None
            self.counts["prompts truncated from the left"] += 1
            ids = ids[-self.max_prompt_tokens :]
        return ids

    def response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_response_tokens:
            self.counts["responses cut"] += 1
            ids = ids[: self.max_response_tokens - 1]
        return ids + [self.tokenizer.eos_token_id]


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one length: ``(ids [B, T], mask [B, T])``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    return ids, mask
