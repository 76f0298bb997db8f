"""Pairwise preference probabilities and the PM divergence (Sec. 2.1, Sec. 5.1, Sec. 6.1).

Shapes are elementwise: any ``[...]`` in, the same ``[...]`` out. Everything is computed from
log-probabilities and reward differences in log space, so a 300-token response whose probability
underflows to 0 in float32 still gives the right preference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def btl(r1: torch.Tensor, r2: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``P(y1 > y2 | x) = e^{r1/beta} / (e^{r1/beta} + e^{r2/beta})``: eq. (2.1), with Table 5's beta scaling."""
    return torch.sigmoid((r1 - r2) / beta)


def pairwise(logp1: torch.Tensor, logp2: torch.Tensor) -> torch.Tensor:
    """A policy's preference ``p(y1 | y1, y2, x) = pi(y1|x) / (pi(y1|x) + pi(y2|x))`` (Table 5, Sec. 6.1).

    Naive equivalent: ``exp(logp1) / (exp(logp1) + exp(logp2))``, which is 0/0 for long responses.
    """
    return torch.sigmoid(logp1 - logp2)


def _bernoulli_kl_from_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid(a)) || Bern(sigmoid(b))), stable for logits of any size."""
    p = torch.sigmoid(a)
    return p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))


def instance_pm_divergence(
    logp1: torch.Tensor, logp2: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Instance PM divergence, Sec. 6.1: ``KL(p_llm(.|y1,y2,x) || p_reward(.|y1,y2,x))``.

    ``p_llm`` from the policy's sequence log-probabilities, ``p_reward`` from ``r / beta`` (Table 5).
    Naive equivalent: ``p * log(p / q) + (1 - p) * log((1 - p) / (1 - q))`` with ``p = pairwise(...)`` and
    ``q = btl(...)``.
    """
    return _bernoulli_kl_from_logits(logp1 - logp2, (r1 - r2) / beta)


def pm_divergence(
    logp1: torch.Tensor, logp2: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Aggregate PM divergence, Sec. 6.1: the mean instance PM divergence over prompts (a scalar)."""
    return instance_pm_divergence(logp1, logp2, r1, r2, beta).mean()
