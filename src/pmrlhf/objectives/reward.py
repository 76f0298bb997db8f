"""Reward-model losses: Bradley-Terry on pairs (eq. (2.2)), all C(K,2) pairs of a ranking, Plackett-Luce.

Scores come in ``[N, K]`` with each row *ordered best first* and ``mask [N, K]`` marking real entries (rows
may have different K). A comparison is a ranking with K = 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's K-wise loss: every one of the C(K,2) pairs of a ranking, in one batch element.

    ``loss = mean_rows [ -1/C(K,2) sum_{i<j} log sigmoid(s_i - s_j) ]`` with ``s`` ordered best first. For
    K = 2 it is eq. (2.2). One forward pass per response gives all the pairs.
    """
    N, K = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    diff = scores[:, :, None] - scores[:, None, :]  # [N, K, K]: s_i - s_j
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=scores.device), diagonal=1)
    pairs = upper[None] & mask[:, :, None] & mask[:, None, :]
    per_row = -(F.logsigmoid(diff) * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return per_row.mean()


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of each ranking (App. A.1, Assumption A.1), averaged over rows.

    ``-log P(ranking) = -sum_i [ s_(i) - log sum_{j >= i} e^{s_(j)} ]`` with ``s`` ordered best first.
    """
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    masked = scores.masked_fill(~mask, float("-inf"))
    # log sum_{j >= i} e^{s_j}: a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(mask, scores - tail, torch.zeros_like(scores))
    return -terms.sum(-1).mean()


def pair_accuracy(scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of ordered pairs (i better than j) the model scores the right way round, and their mean margin."""
    N, K = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    diff = scores[:, :, None] - scores[:, None, :]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=scores.device), diagonal=1)
    pairs = upper[None] & mask[:, :, None] & mask[:, None, :]
    n = pairs.sum().clamp(min=1)
    return ((diff > 0) & pairs).sum() / n, (diff * pairs).sum() / n


def mixture_pairwise_loss(margins: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The M-step of EM for a mixture of Bradley-Terry models: each group's eq. (2.2) on every comparison, weighted
    by the posterior probability that its labeler is in the group. ``margins [N, G]``: each group's score of the
    chosen response minus the rejected one's; ``weights [N, G]``: the posteriors (rows sum to 1)."""
    return -(weights * F.logsigmoid(margins)).sum(-1).mean()


def mixture_preference(margins: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """``P(chosen beats rejected) = sum_g share_g sigmoid(margin_g)`` for a labeler not known: ``[N]``."""
    return (shares * torch.sigmoid(margins)).sum(-1)


REWARD_LOSSES = {"pairwise": kwise_loss, "listwise": listwise_loss}
