"""The four record types every source is turned into, and the converters that do it.

A converter maps one raw row (a dict, after the config's column mapping) to a *canonical* dict with some of
the fields ``prompt, response, chosen, rejected, responses, ranking``; ``as_record`` then extracts the record
type a stage asks for. So one Dahoas/full-hh-rlhf file serves SFT (prompt + chosen), the reward model
(prompt, chosen, rejected) and RL (prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ChatPrompt(str):
    """A conversation's prompt: its text in the hh-rlhf layout, and the messages it came from, which an encoder
    asked to use the tokenizer's chat template (``data.chat_template``) renders with that template instead."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, text: str, messages):
        prompt = super().__new__(cls, text)
        prompt.messages = tuple(dict(m) for m in messages)
        return prompt


class ChatReply(str):
    """An assistant's reply in a conversation: its text as it follows the hh-rlhf layout's ``Assistant:`` (after a
    space), and its ``content`` as written, which follows a chat template's opening of the assistant's turn."""

    content: str

    def __new__(cls, text: str, content: str):
        reply = super().__new__(cls, text)
        reply.content = content
        return reply


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    labeler: str | None = None  # who labelled it, where the data says


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]  # indices into responses, best first

    @property
    def ordered(self) -> list[str]:
        return [self.responses[i] for i in self.ranking]


@dataclass(frozen=True)
class Prompt:
    prompt: str


Record = Demonstration | Comparison | Ranking | Prompt
KINDS: dict[str, type] = {
    "demonstration": Demonstration,
    "comparison": Comparison,
    "ranking": Ranking,
    "prompt": Prompt,
}


class RowError(ValueError):
    """A problem with one field of one row; the loader adds the file and the row number."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _text(row: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    if field not in row:
        raise RowError(field, f"missing column '{field}' (columns: {sorted(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}: {str(value)[:60]!r}")
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty")
    return value


# --- converters: raw row -> canonical dict -------------------------------------------------------------------


def demonstration(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _text(row, "prompt"), "response": _text(row, "response")}


def comparison(row: dict[str, Any]) -> dict[str, Any]:
    """``prompt, chosen, rejected`` strings: TRL's standard preference format, TL;DR-style comparisons."""
    return {"prompt": _text(row, "prompt"), "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}


def tldr(row: dict[str, Any]) -> dict[str, Any]:
    """TL;DR comparisons (``prompt, chosen, rejected``), dropping a ``TL;DR:`` the summaries repeat from the prompt."""
    out = comparison(row)
    if out["prompt"].rstrip().endswith("TL;DR:"):
        for key in ("chosen", "rejected"):
            text = out[key].lstrip()
            if text.startswith("TL;DR:"):
                out[key] = " " + text[len("TL;DR:") :].lstrip()
    return out


def full_hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    """Dahoas/full-hh-rlhf: ``prompt, response, chosen, rejected``; the demonstration is ``prompt + chosen``."""
    out = comparison(row)
    out["response"] = out["chosen"]
    return out


_ASSISTANT = "\n\nAssistant:"


def _split_dialogue(text: str, field: str) -> tuple[str, str]:
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise RowError(field, "has no '\\n\\nAssistant:' turn to split the final response from")
    prompt, response = text[: cut + len(_ASSISTANT)], text[cut + len(_ASSISTANT) :]
    if not response.strip():
        raise RowError(field, "its final assistant turn is empty")
    return prompt, response


def hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    """Anthropic hh-rlhf: ``chosen`` and ``rejected`` are whole dialogues sharing everything but the last turn.

    The prompt is the shared dialogue up to and including the final ``\\n\\nAssistant:``; the responses are
    the two final assistant turns.
    """
    prompt, chosen = _split_dialogue(_text(row, "chosen"), "chosen")
    prompt_r, rejected = _split_dialogue(_text(row, "rejected"), "rejected")
    if prompt != prompt_r:
        raise RowError("rejected", "does not share the chosen dialogue's history before the final assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "response": chosen}


def _render_messages(messages: Any, field: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise RowError(field, "expected a non-empty list of {role, content} messages")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(field, f"message {m!r} lacks 'role' or 'content'")
        if not isinstance(m["content"], str) or not isinstance(m["role"], str):
            raise RowError(field, f"message {m!r}: role and content must be strings")
        name = {"user": "Human", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
        parts.append(f"\n\n{name}: {m['content']}")
    return "".join(parts)


def trl_conversational(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's conversational preference format: ``prompt`` and ``chosen``/``rejected`` as message lists.

    Rendered in the hh-rlhf layout (``\\n\\nHuman: ...\\n\\nAssistant:``) so that every model sees one format;
    the prompt keeps its messages (``ChatPrompt``), for the tokenizer's chat template where ``data.chat_template``
    asks for it.
    """
    out: dict[str, Any] = {}
    prompt = ChatPrompt(_render_messages(row.get("prompt"), "prompt") + _ASSISTANT, row["prompt"])
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(key, f"missing column '{key}'")
        msgs = row[key]
        if (
            not isinstance(msgs, list)
            or not msgs
            or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in msgs)
            or any(not isinstance(m.get("content"), str) for m in msgs)
        ):
            raise RowError(key, "expected a list of assistant messages whose content is a string")
        content = " ".join(m["content"] for m in msgs)
        out[key] = ChatReply(" " + content, content)
        if not out[key].strip():
            raise RowError(key, "is empty")
    return {"prompt": prompt, **out, "response": out["chosen"]}


def ranking(row: dict[str, Any]) -> dict[str, Any]:
    """``prompt, responses, ranking``: K >= 2 responses and the indices of ``responses`` best first."""
    prompt = _text(row, "prompt")
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError("responses", "expected a list of at least 2 responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise RowError("responses", f"response {i} is empty or not a string")
    order = row.get("ranking")
    whole = isinstance(order, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in order)
    if not whole or sorted(order) != list(range(len(responses))):  # true and false would pass for 1 and 0
        raise RowError("ranking", f"expected a permutation of 0..{len(responses) - 1}, got {order!r}")
    if len(set(responses)) < len(responses):
        raise RowError("responses", "contains the same response twice")
    return {"prompt": prompt, "responses": tuple(responses), "ranking": tuple(int(i) for i in order)}


def prompt_only(row: dict[str, Any]) -> dict[str, Any]:
    """A prompt alone: a text, or TRL's conversational list of messages (kept for the chat template)."""
    if isinstance(row.get("prompt"), list):
        return {"prompt": ChatPrompt(_render_messages(row["prompt"], "prompt") + _ASSISTANT, row["prompt"])}
    return {"prompt": _text(row, "prompt")}


FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "demonstration": demonstration,
    "comparison": comparison,
    "trl_standard": comparison,
    "tldr": tldr,
    "full_hh_rlhf": full_hh_rlhf,
    "hh_rlhf": hh_rlhf,
    "trl_conversational": trl_conversational,
    "ranking": ranking,
    "prompt": prompt_only,
}


def detect_format(row: dict[str, Any]) -> str:
    """Guess the converter from the columns of the first row."""
    cols = set(row)
    if {"responses", "ranking"} <= cols:
        return "ranking"
    if {"chosen", "rejected"} <= cols:
        if isinstance(row["chosen"], list):
            return "trl_conversational"
        if "prompt" not in cols:
            return "hh_rlhf"
        return "full_hh_rlhf" if "response" in cols else "comparison"
    if {"prompt", "response"} <= cols:
        return "demonstration"
    if "prompt" in cols:
        return "prompt"
    raise RowError("*", f"cannot tell the format from the columns {sorted(cols)}; set data.format")


def as_record(canon: dict[str, Any], kind: str) -> Record:
    """The record of type ``kind`` from a canonical dict, with the checks every record needs."""
    if kind == "prompt":
        return Prompt(canon["prompt"])
    if kind == "demonstration":
        response = canon.get("response", canon.get("chosen"))
        if response is None:
            raise RowError("response", "this format has no demonstration response")
        return Demonstration(canon["prompt"], response)
    if kind == "comparison":
        if "chosen" not in canon:
            if "ranking" in canon:  # best against worst of a ranking
                ordered = [canon["responses"][i] for i in canon["ranking"]]
                return Comparison(canon["prompt"], ordered[0], ordered[-1])
            raise RowError("chosen", "this format has no comparisons")
        if canon["chosen"].strip() == canon["rejected"].strip():
            raise RowError("rejected", "is identical to chosen")
        return Comparison(canon["prompt"], canon["chosen"], canon["rejected"], canon.get("labeler"))
    if kind == "ranking":
        if "ranking" in canon:
            return Ranking(canon["prompt"], canon["responses"], canon["ranking"])
        if "chosen" in canon:
            if canon["chosen"].strip() == canon["rejected"].strip():
                raise RowError("rejected", "is identical to chosen")
            return Ranking(canon["prompt"], (canon["chosen"], canon["rejected"]), (0, 1))
        raise RowError("ranking", "this format has no rankings")
    raise ValueError(f"unknown record kind {kind!r}; known: {sorted(KINDS)}")
