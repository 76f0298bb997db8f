"""Log-probabilities and rewards of (prompt, response) pairs, batched."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from pmrlhf.data.tokenize import pad


def join(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + response`` ids with their attention mask and response mask, each ``[B, T]``."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids, attn = pad(seqs, pad_id, "right")
    resp = torch.zeros_like(attn)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        resp[i, len(p) : len(p) + len(r)] = 1
    return ids, attn, resp


# Architectures whose logits are their output embedding applied to the last hidden state and nothing after it
# (no soft-capping, no logit scale): for them the full-vocabulary logits of a batch are never held at once.
HEAD_ONLY = frozenset({"gpt2", "llama", "mistral", "opt", "qwen2", "qwen3", "gpt_neox"})
CHUNK_BYTES = 2**28  # float32 logits of one chunk of tokens: 256 MiB
# On a CPU, a chunk of at most 512 tokens keeps its logits in the caches, where larger chunks spill out of them and
# slow the head's forward and backward passes (docs/performance.md).
CPU_CHUNK_TOKENS = 512


def token_logprobs(
    model, ids: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor | None = None, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """``log pi(ids[t] | ids[<t])`` at every position ``t >= 1``, as ``[B, T]`` with column 0 set to 0; given
    ``keep`` ``[B, T]`` (a response mask), at the positions it marks only, and 0 elsewhere.

    The naive form holds the logits of every token over the whole vocabulary in float32, ``[B, T, V]``, twice
    (logits and log-softmax): at V = 128k, T = 1024, B = 8, 4 GB each, the memory peak of every PPO and DPO step.
    For ``HEAD_ONLY`` architectures the output embedding is replaced, for this one forward pass, by a head that
    turns the last hidden states into the sampled tokens' log-probabilities a chunk of ``chunk_bytes`` of logits
    at a time (on a CPU, of at most ``CPU_CHUNK_TOKENS`` tokens); in a pass that builds a graph, each chunk's
    logits are recomputed in the backward pass instead of kept (activation checkpointing). The swap happens
    inside the model's own forward pass, so autocast, DDP, FSDP and DeepSpeed see the pass they always see. The
    arithmetic per token is the naive form's, and where the batch fits in one chunk the result is the same bit
    for bit.

    With ``keep``, the head runs on the kept positions' hidden states only, as TRL's trainers do by passing
    ``logits_to_keep``: a prompt's tokens cost no vocabulary projection, forward or backward. With a 32-token
    prompt and 16 new tokens that spares two thirds of the head's work, where the head (8,192 words) is a fifth
    of the forward pass of a 24 M-parameter Llama.
    """
    causal_lm = _transformers_model(model)
    if getattr(causal_lm.config, "model_type", None) not in HEAD_ONLY:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.nn.functional.pad(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
        return logp if keep is None else logp * keep
    head = causal_lm.get_output_embeddings()
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    if ids.device.type == "cpu":
        rows = min(rows, CPU_CHUNK_TOKENS)
    # the hidden state at t - 1 gives the log-probability of token t; the last position has no next token
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    wanted = None if keep is None else torch.nn.functional.pad(keep[:, 1:], (0, 1)).bool()
    causal_lm.set_output_embeddings(_LogProbHead(head, targets, rows, wanted))
    try:
        logp = model(input_ids=ids, attention_mask=attn).logits[..., 0].float()
    finally:
        causal_lm.set_output_embeddings(head)
    return torch.nn.functional.pad(logp[:, :-1], (1, 0))


class _LogProbHead(torch.nn.Module):
    """An output embedding that returns, in place of logits ``[B, T, V]``, the log-probability of ``targets``
    ``[B, T]`` as ``[B, T, 1]``, ``rows`` tokens at a time: at the positions ``wanted`` marks (0 elsewhere), or
    at all of them."""

    def __init__(self, head: torch.nn.Module, targets: torch.Tensor, rows: int, wanted: torch.Tensor | None):
        super().__init__()
        self.head, self.targets, self.rows, self.wanted = head, targets, rows, wanted

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden.shape
        flat, targets = hidden.reshape(B * T, H), self.targets.reshape(B * T)
        if self.wanted is not None:
            at = self.wanted.reshape(B * T).nonzero().squeeze(-1)
            flat, targets = flat.index_select(0, at), targets[at]
        keep_graph = torch.is_grad_enabled() and flat.requires_grad
        pieces = []
        for s in range(0, max(1, flat.shape[0]), self.rows):  # an empty selection still joins the graph
            args = (flat[s : s + self.rows], targets[s : s + self.rows])
            pieces.append(checkpoint(self._logp, *args, use_reentrant=False) if keep_graph else self._logp(*args))
        logp = torch.cat(pieces)
        if self.wanted is not None:
            logp = logp.new_zeros(B * T).index_copy(0, at, logp)
        return logp.view(B, T, 1)

    def _logp(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def sequence_scores(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """A reward model's score of each sequence ``[B]`` (``[B, G]`` for a mixture's G labeler groups), read at its
    last attended token: the end-of-sequence token that closes a response, or the last token of one cut at its
    length limit.

    transformers' sequence classifiers read the last token that is not the pad token, which is the token before
    the end of sequence wherever the two are one token (GPT-2, Llama-3 and every tokenizer without a pad token):
    the score would then not see whether the response ended. Here the score head is replaced, for this one
    forward pass, by one that puts the last attended token's score at every position, so that whichever position
    the model reads, training, PPO and evaluation all read that one; through the model's own forward pass, as DDP,
    FSDP and DeepSpeed need. A model without a ``score`` head is read as transformers reads it.
    """
    inner = _transformers_model(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        return _per_group(model(input_ids=ids, attention_mask=attn).logits)
    last = attn.shape[1] - 1 - attn.flip(-1).argmax(-1)
    inner.score = _AtToken(head, last)
    try:
        return _per_group(model(input_ids=ids, attention_mask=attn).logits)
    finally:
        inner.score = head


def _per_group(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] if logits.shape[1] == 1 else logits).float()


class _AtToken(torch.nn.Module):
    """A score head whose output at every position of a sequence is its score at position ``index``."""

    def __init__(self, head: torch.nn.Module, index: torch.Tensor):
        super().__init__()
        self.head, self.index = head, index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.head(hidden)  # [B, T, labels]
        at = scores[torch.arange(scores.shape[0], device=scores.device), self.index.to(scores.device)]
        return at[:, None, :].expand_as(scores)


def _transformers_model(model):
    """The transformers model inside the wrappers of training (DDP, DeepSpeed's engine, PEFT, torch.compile)."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
            model = model.module
    return model


@torch.no_grad()
def response_token_logprobs(
    model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(T_t | T_<t, x) [B, L], mask [B, L])`` of every response token, teacher-forced, each row's tokens
    from column 0 (``L`` the longest response)."""
    device = next(model.parameters()).device
    width = max((len(r) for r in responses), default=0)
    out = torch.zeros(len(prompts), width)
    mask = torch.zeros(len(prompts), width)
    for s in range(0, len(prompts), batch_size):
        ids, attn, resp = (
            t.to(device) for t in join(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id)
        )
        logp = token_logprobs(model, ids, attn, keep=resp).cpu()
        for i, row in enumerate(resp.cpu().bool()):
            n = int(row.sum())
            out[s + i, :n] = logp[i][row]
            mask[s + i, :n] = 1
    return out, mask


def sequence_logprobs(
    model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(y|x) [B], number of response tokens [B])`` for every pair, teacher-forced."""
    logp, mask = response_token_logprobs(model, prompts, responses, pad_id, batch_size)
    return (logp * mask).sum(-1), mask.sum(-1).long()


@torch.no_grad()
def reward_scores(
    model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """The reward model's score of every (prompt, response) pair, ``[B]`` (``[B, G]`` for a mixture)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, attn, _ = join(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id)
        out.append(sequence_scores(model, ids.to(device), attn.to(device)).cpu())
    return torch.cat(out)


def critic_values(critic, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Values aligned with tokens: position ``t`` holds V(state before token t), read at position ``t - 1``."""
    return torch.nn.functional.pad(critic(ids, attn)[:, :-1], (1, 0))
