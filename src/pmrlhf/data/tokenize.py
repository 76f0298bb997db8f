"""Turning records into token ids: prompt truncation or skipping (counted), response cut, end-of-sequence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from pmrlhf.config import DataConfig, InputError
from pmrlhf.data.records import ChatPrompt, ChatReply

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"  # the synthetic world's special tokens


@dataclass
class Encoder:
    """Encode prompts and responses the same way in every stage.

    Prompts longer than ``max_prompt_tokens`` are cut from the left (keeping the end, which the response
    follows) or skipped, per ``overflow``; responses are cut to ``max_response_tokens`` and end with EOS.
    ``counts`` records what happened, for the run's report, and how many of the data's ``tokens`` the tokenizer
    did not know (its unknown token): a model trained on those learns nothing of the words they stand for.
    """

    tokenizer: object
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    overflow: str = "truncate_left"
    counts: Counter = field(default_factory=Counter)
    capped_by: int | None = None  # the model's positions, where they lowered max_prompt_tokens
    chat_template: bool = False  # conversations' prompts through the tokenizer's chat template
    max_unknown_share: float = 1.0  # share of unknown tokens above which ``check_unknown`` refuses the data
    tokens: int = 0  # tokens encoded from the data's text
    _start: list[int] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.overflow not in ("truncate_left", "skip"):
            raise ValueError(f"prompt_overflow must be 'truncate_left' or 'skip', got {self.overflow!r}")

    @classmethod
    def from_data(cls, tokenizer, data: DataConfig, context: int | None = None, new_tokens: int = 0) -> Encoder:
        """The encoder a stage's data section asks for, its limits capped so that a prompt and its response fit the
        model's ``context`` positions (past them the position embeddings have no entry). A stage that generates
        ``new_tokens`` keeps them and gives the prompt the rest; any other splits the context, the response
        taking at most half."""
        response = new_tokens or data.max_response_tokens
        prompt, capped_by = data.max_prompt_tokens, None
        if context is not None and prompt + response > context:
            capped_by = context
            if new_tokens >= context:
                raise InputError(
                    f"max_new_tokens = {new_tokens} leaves no room for a prompt in the model's {context} positions"
                )
            response = new_tokens or min(response, max(context // 2, context - prompt))
            prompt = min(prompt, context - response)
        cut = min(data.max_response_tokens, context - prompt) if capped_by else data.max_response_tokens
        if data.chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise InputError("data.chat_template is set, but the tokenizer has no chat template")
        return cls(
            tokenizer,
            prompt,
            cut,
            data.prompt_overflow,
            capped_by=capped_by,
            chat_template=data.chat_template,
            max_unknown_share=data.max_unknown_share,
        )

    def summary(self) -> str:
        """What encoding changed, for a person: empty when nothing was cut or skipped."""
        if not self.counts:
            return ""
        text = ", ".join(f"{n} {why}" for why, n in self.counts.items())
        if self.capped_by is not None:
            text += (
                f" (prompts are limited to {self.max_prompt_tokens} tokens and responses to "
                f"{self.max_response_tokens} so that both fit the model's {self.capped_by} positions)"
            )
        return text

    def check_unknown(self, stage: str) -> None:
        """Refuse data whose tokens the tokenizer mostly does not know: training went on, on ``<unk>``s."""
        unknown = self.counts[UNKNOWN]
        if self.tokens and unknown / self.tokens > self.max_unknown_share:
            raise InputError(
                f"{stage}: {unknown} of the data's {self.tokens} tokens ({unknown / self.tokens:.0%}) are the "
                f"tokenizer's unknown token {self.tokenizer.unk_token!r}: its vocabulary lacks the data's words. Use "
                "a model whose tokenizer covers them, or raise data.max_unknown_share"
            )

    def _counted(self, ids: list[int]) -> list[int]:
        self.tokens += len(ids)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        n = ids.count(unk) if unk is not None and unk != self.tokenizer.eos_token_id else 0  # GPT-2's is its EOS
        if n:  # counted only where there are any: ``summary`` lists what happened
            self.counts[UNKNOWN] += n
        return ids

    def prompts(self, texts) -> list[list[int]]:
        """Every prompt that fits, encoded; skipped ones are left out (and counted)."""
        return [ids for ids in (self.prompt(t) for t in texts) if ids is not None]

    def prompt(self, text: str) -> list[int] | None:
        """The prompt's ids, after the special tokens the tokenizer puts before a text (Llama's and OPT's BOS), as
        the model saw them in pre-training; none of those it puts after one (the response follows). A
        conversation's prompt, with ``chat_template``, is its messages in the tokenizer's chat template, ending
        with the opening of the assistant's turn."""
        if self.chat_template and isinstance(text, ChatPrompt):
            messages = list(text.messages)
            ids = self._counted(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            )
        else:
            ids = self.start_tokens() + self._counted(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > self.max_prompt_tokens:
            if self.overflow == "skip":
                self.counts["prompts skipped (too long)"] += 1
                return None
            self.counts["prompts truncated from the left"] += 1
            ids = self._truncated(ids)
        return ids

    def _truncated(self, ids: list[int]) -> list[int]:
        """The last ``max_prompt_tokens`` ids, after the start tokens where the prompt begins with them: a cut
        from the left keeps the BOS a model always saw first."""
        start = self.start_tokens()
        if not start or ids[: len(start)] != start or len(start) >= self.max_prompt_tokens:
            return ids[-self.max_prompt_tokens :]
        return start + ids[len(start) :][-(self.max_prompt_tokens - len(start)) :]

    def start_tokens(self) -> list[int]:
        """The special tokens the tokenizer puts before every text: those before a one-word text's own ids."""
        if self._start is None:
            plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
            full = self.tokenizer("x")["input_ids"]
            at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
            self._start = list(full[:at])
        return self._start

    def response(self, text: str) -> list[int]:
        """The response's ids and the end of sequence; a conversation's reply, after a chat template, as written
        (its hh-rlhf text has a space after ``Assistant:`` that the template's turn does not)."""
        if self.chat_template and isinstance(text, ChatReply):
            text = text.content
        ids = self._counted(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= self.max_response_tokens:
            self.counts["responses cut"] += 1
            ids = ids[: self.max_response_tokens - 1]
        return ids + [self.tokenizer.eos_token_id]


UNKNOWN = "tokens unknown to the tokenizer"


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


def word_tokenizer(vocabulary: list[str], pad: str = PAD, eos: str = EOS, unk: str = UNK):
    """A word-level tokenizer over ``vocabulary`` (the synthetic world's) as a ``PreTrainedTokenizerFast``: words
    split at white space, ``eos`` also the beginning of a sequence, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk, bos_token=eos)
    fast.padding_side = "left"
    return fast
