"""Log-probabilities and rewards of (prompt, response) pairs, batched."""

from __future__ import annotations

import torch

from pmrlhf.data.tokenize import pad


def join(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + response`` ids with their attention mask and response mask, each ``[B, T]``."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids, attn = pad(seqs, pad_id, "right")
    resp = torch.zeros_like(attn)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        resp[i, len(p) : len(p) + len(r)] = 1
    return ids, attn, resp


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``log pi(ids[t] | ids[<t])`` at every position ``t >= 1``, as ``[B, T]`` with column 0 set to 0."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))


@torch.no_grad()
def sequence_logprobs(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int = 64,
    below: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(y|x) [B], number of response tokens [B])`` for every pair, teacher-forced. With ``below``, the
    sum is over the response tokens whose log-probability is below it only."""
    device = next(model.parameters()).device
    totals, lengths = [], []
    for s in range(0, len(prompts), batch_size):
        ids, attn, resp = (
            t.to(device) for t in join(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id)
        )
        logp = token_logprobs(model, ids, attn)
        counted = resp if below is None else resp * (logp < below)
        totals.append((logp * counted).sum(-1).cpu())
        lengths.append(resp.sum(-1).cpu())
    return torch.cat(totals), torch.cat(lengths)


@torch.no_grad()
def reward_scores(
    model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """The reward model's score of every (prompt, response) pair, ``[B]``."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, attn, _ = join(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id)
        out.append(model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, 0].float().cpu())
    return torch.cat(out)


def critic_values(critic, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Values aligned with tokens: position ``t`` holds V(state before token t), read at position ``t - 1``."""
    return torch.nn.functional.pad(critic(ids, attn)[:, :-1], (1, 0))
