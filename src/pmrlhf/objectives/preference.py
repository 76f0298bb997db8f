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


def btl_fit(
    preference: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None, iters: int = 100
) -> torch.Tensor:
    """The reward a Bradley-Terry model fitted to unlimited pairwise labels converges to: the maximiser of the
    expected log-likelihood ``sum_{i != j} w_ij P_ij log sigmoid(r_i - r_j)`` of eq. (2.2), with ``P_ij``
    (``preference``, ``[..., k, k]``, ``P_ij + P_ji = 1``) the probability that ``i`` is labelled the winner and
    ``w_ij`` (``weights``, symmetric) how often the pair is compared. Where ``P`` is BTL in some r* (and the pairs
    connect every response) that is r*; otherwise it depends on ``w``. Centred over ``mask`` (``[..., k]``, the
    entries that exist). Newton's method in float64 with halving steps: the objective is concave, its gradient
    ``g_i = sum_j w_ij (P_ij - sigmoid(r_i - r_j))`` and its Hessian a weighted graph Laplacian."""
    P, W = preference.double(), weights.double()
    k = P.shape[-1]
    mask = torch.ones(P.shape[:-1], dtype=torch.bool) if mask is None else mask
    pair = mask[..., :, None] & mask[..., None, :] & ~torch.eye(k, dtype=torch.bool)
    W = torch.where(pair, W, 0.0)
    W = W / W.sum((-2, -1), keepdim=True).clamp(min=1e-300)
    P = torch.where(pair, P, 0.5)
    eye = torch.eye(k, dtype=torch.float64)
    # the ones direction (a shift of every reward) leaves the likelihood unchanged: fixed by the centring term
    gauge = (mask[..., :, None] & mask[..., None, :]).double() / mask.sum(-1)[..., None, None].clamp(min=1)
    absent = (~mask).double()[..., :, None] * eye

    def log_likelihood(r: torch.Tensor) -> torch.Tensor:
        return (W * P * F.logsigmoid(r[..., :, None] - r[..., None, :])).sum((-2, -1))

    r = torch.zeros(P.shape[:-1], dtype=torch.float64)
    value = log_likelihood(r)
    for _ in range(iters):
        s = torch.sigmoid(r[..., :, None] - r[..., None, :])
        gradient = (W * (P - s)).sum(-1)
        if gradient.abs().max() < 1e-15:
            break
        c = W * s * (1 - s)
        # minus the likelihood's Hessian, made regular; the ridge keeps a response no label compares (or a set of
        # them compared only among themselves) where it is rather than failing: it moves a step, not the optimum
        hessian = c.sum(-1)[..., :, None] * eye - c + gauge + absent + 1e-12 * eye
        step = torch.linalg.solve(hessian, gradient[..., None])[..., 0]
        scale = torch.ones_like(value)
        for _ in range(30):  # halve where a full step would lower the likelihood (it never does near the optimum)
            new = r + scale[..., None] * step
            new_value = log_likelihood(new)
            worse = new_value < value - 1e-15
            if not worse.any():
                break
            scale = torch.where(worse, scale / 2, scale)
        r, value = new, new_value
    mean = torch.where(mask, r, 0.0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(mask, r - mean, 0.0)


def btl_fit_of_counts(wins: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``btl_fit`` of observed labels: ``wins [..., k, k]`` counts (or weights) of ``i`` labelled over ``j``."""
    seen = wins + wins.transpose(-1, -2)
    return btl_fit(torch.where(seen > 0, wins / seen.clamp(min=1e-300), 0.5), seen, mask)


def mixture_distribution(rewards: torch.Tensor, shares: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A mixture's distribution over M(x), ``sum_g share_g softmax(r_g)``: ``rewards [G, P, k]``, ``shares [G]``."""
    return (shares[:, None, None] * torch.softmax(rewards.masked_fill(~mask, float("-inf")), -1)).sum(0)


def mixture_btl_em(
    prompt: torch.Tensor,
    winner: torch.Tensor,
    loser: torch.Tensor,
    labeler: torch.Tensor,
    mask: torch.Tensor,
    groups: int = 2,
    iters: int = 100,
    restarts: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture of ``groups`` Bradley-Terry models (eq. (2.1), one reward per group) fitted by EM to labelled
    comparisons, each labeler in one latent group, as MaxMin-RLHF (Chakraborty et al., 2024) learns its groups.

    Comparison ``c`` labels ``winner[c]`` over ``loser[c]`` (indices into M(x) of prompt ``prompt[c]``, whose
    responses are ``mask[prompt[c]]``) and was made by ``labeler[c]``. E-step: each labeler's posterior over the
    groups from the likelihood of all its labels; M-step: each group's reward the BTL fit (``btl_fit``) to the
    labels weighted by that posterior, and the groups' prior the mean posterior. The best of ``restarts`` random
    starts by likelihood. Returns the groups' shares of the comparisons ``[G]``, their rewards ``[G, P, k]``
    (centred over ``mask``) and the labelers' posteriors ``[L, G]``; the mixture's distribution over M(x) is
    ``sum_g share_g softmax(r_g)``. With every comparison its own labeler the group is latent per comparison: the
    labels then determine only the population's pairwise preference, which several mixtures fit."""
    n_labelers, (n_prompts, k) = int(labeler.max()) + 1, mask.shape
    per_labeler = torch.zeros(n_labelers, dtype=torch.float64).index_add_(0, labeler, torch.ones(len(labeler)).double())
    group = torch.arange(groups)[:, None].expand(groups, len(labeler))
    best: tuple | None = None
    for _ in range(restarts):
        # a random start, Dirichlet(1) per labeler by normalised exponentials
        e = -torch.log(torch.rand(n_labelers, groups, generator=generator, dtype=torch.float64))
        posterior = e / e.sum(-1, keepdim=True)
        for _ in range(iters):
            counts = torch.zeros(groups, n_prompts, k, k, dtype=torch.float64)
            counts.index_put_((group, prompt, winner, loser), posterior[labeler].T, accumulate=True)
            rewards = btl_fit_of_counts(counts, mask)
            prior = posterior.mean(0)
            margin = rewards[:, prompt, winner] - rewards[:, prompt, loser]  # [G, C]
            log_lik = torch.zeros(n_labelers, groups, dtype=torch.float64).index_add_(
                0, labeler, F.logsigmoid(margin).T
            )
            joint = log_lik + torch.log(prior.clamp(min=1e-300))
            posterior = torch.softmax(joint, -1)
        total = torch.logsumexp(joint, -1).sum().item()
        if best is None or total > best[0]:
            best = (total, (posterior * per_labeler[:, None]).sum(0) / per_labeler.sum(), rewards, posterior)
    return best[1], best[2], best[3]
