"""Generation and scoring for on-policy RL: prompts in, a ``Trajectory`` of padded tensors out."""

from __future__ import annotations

from typing import NamedTuple

import torch

from pmrlhf.data.tokenize import pad
from pmrlhf.models.scoring import join, token_logprobs


class Trajectory(NamedTuple):
    """One batch of generated responses and everything PPO needs about them. ``B`` sequences, ``T`` tokens.

    Sequences are ``prompt + response`` right-padded; per-token tensors are aligned with the token they
    score (position ``t`` holds ``log pi(ids[t] | ids[<t])``), and ``response_mask`` marks response tokens.
    """

    ids: torch.Tensor  # [B, T] token ids
    attention_mask: torch.Tensor  # [B, T] 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, T] 1 on response tokens (the end-of-sequence token included)
    logp: torch.Tensor  # [B, T] actor log-probabilities at sampling time
    ref_logp: torch.Tensor  # [B, T] reference log-probabilities
    values: torch.Tensor  # [B, T] critic values of the state before each token (zeros without a critic)
    scores: torch.Tensor  # [B] reward-model scores of the whole response
    prompt_index: torch.Tensor  # [B] which prompt of the batch each sample answers (groups for RLOO)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    tokenizer,
    max_new_tokens: int,
    top_p: float,
    temperature: float,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sample one response per prompt; each ends at its first end-of-sequence token (kept) or at the limit.

    A response that is only the end-of-sequence token is an empty text, kept and scored as written.
    """
    device = next(model.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, attn = pad(chunk, pad_id, "left")
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            top_p=top_p,
            top_k=0,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
        )
        for row in seqs[:, ids.shape[1] :].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:cut])
    return out


def critic_values(critic, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Values aligned with tokens: position ``t`` holds V(state before token t), read at position ``t - 1``."""
    return torch.nn.functional.pad(critic(ids, attn)[:, :-1], (1, 0))


@torch.no_grad()
def score(
    actor,
    reference,
    reward_model,
    critic,
    prompts: list[list[int]],
    responses: list[list[int]],
    prompt_index: torch.Tensor,
    pad_id: int,
) -> Trajectory:
    """Teacher-forced log-probabilities of actor and reference, critic values and reward-model scores."""
    device = next(actor.parameters()).device
    ids, attn, resp = (t.to(device) for t in join(prompts, responses, pad_id))
    logp = token_logprobs(actor, ids, attn) * resp
    ref_logp = token_logprobs(reference, ids, attn) * resp
    values = critic_values(critic, ids, attn) * resp if critic is not None else torch.zeros_like(logp)
    scores = reward_model(input_ids=ids, attention_mask=attn).logits[:, 0].float()
    return Trajectory(ids, attn, resp, logp, ref_logp, values, scores, prompt_index.to(device))
