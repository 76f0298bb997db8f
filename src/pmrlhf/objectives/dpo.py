"""The DPO family and its preference-matching counterpart, as losses on sequence log-probabilities.

Every loss takes N comparisons (y_w preferred to y_l) as one ``Pairs`` record (the policy's sequence
log-probabilities of both responses, the reference's where the loss needs them, the lengths where it normalises
by them) and its hyper-parameters as keywords; it returns the per-comparison loss ``[N]`` (take ``.mean()``).
``DPO_LOSSES`` says of each which hyper-parameters it takes and whether it needs a reference.

Each is "Bradley-Terry with an implicit reward": the optimum of a regularised objective, solved for the
reward and put into eq. (2.1), so that fitting comparisons fits the policy.

* DPO (Rafailov et al., 2023): the KL objective (2.3) has optimum ``pi_ref e^{r/beta} / Z`` (eq. (5.1)), so
  ``r = beta log(pi / pi_ref) + beta log Z(x)`` and ``P(y_w > y_l) = sigmoid(beta (h_w - h_l))`` with
  ``h = log pi - log pi_ref``. Its optimum inherits the reference's bias exactly as KL RLHF does.
* PM-DPO: the PM objective ``r/beta - log pi`` (3.10, Sec. 6) has optimum ``e^{r/beta} / Z`` (Thm. 1), so
  ``r = beta log pi + beta log Z(x)`` and ``h = log pi``: no reference at all. Minimised on BTL comparisons
  with reward r*, its optimum over any finite response set connected by the compared pairs is the PL
  distribution ``e^{r*/beta}``, conditional on that set. The loss says nothing about responses never
  compared, so mass may leave M(x) (as PM RLHF's does).
* Conditional PM-DPO: Def. 4.1's objective has optimum ``e^{r/beta} w(y) / Z`` with ``w = 1`` where
  ``pi_ref(y|x) >= alpha`` and ``w = pi_ref`` below (Thm. 4), so ``h = log pi - 1[pi_ref < alpha] log pi_ref``:
  PM-DPO on responses the reference finds plausible, DPO on the rest.

Derivations, with their assumptions, are in ``docs/dpo.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Pairs(NamedTuple):
    """N comparisons, y_w preferred to y_l, as every loss takes them: sequence log-probabilities ``[N]`` of the
    policy and of the reference (None for a loss that needs no reference), and the responses' lengths in tokens
    (None for a loss that does not normalise by length)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_len: torch.Tensor | None = None
    rejected_len: torch.Tensor | None = None

    def margin(self) -> torch.Tensor:
        """``h_w - h_l`` with ``h = log pi - log pi_ref``: the implicit reward margin of DPO, over beta."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")


def dpo_sigmoid(x: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, and with ``label_smoothing = eps`` conservative DPO (the textbook chapter's cDPO):
    ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``, ``delta = h_w - h_l``."""
    _check_beta(beta)
    delta = x.margin()
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def dpo_robust(x: Pairs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024): an unbiased loss under label-flip rate ``eps`` < 0.5,
    ``[-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)] / (1 - 2 eps)``."""
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    delta = x.margin()
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo(x: Pairs, *, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al., 2024, eq. 17): ``(delta - 1 / (2 beta))^2`` with per-token log-ratios
    (``h / length``), the normalisation the IPO authors use and TRL follows."""
    _check_beta(beta)
    delta = (x.chosen - x.ref_chosen) / x.chosen_len.clamp(min=1) - (
        x.rejected - x.ref_rejected
    ) / x.rejected_len.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def simpo(x: Pairs, *, beta: float = 2.0, simpo_gamma: float = 1.0) -> torch.Tensor:
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin gamma:
    ``-log sigmoid(beta (log pi_w / |y_w| - log pi_l / |y_l|) - gamma)``."""
    _check_beta(beta)
    delta = x.chosen / x.chosen_len.clamp(min=1) - x.rejected / x.rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * delta - simpo_gamma)


def pm_dpo(x: Pairs, *, beta: float = 1.0) -> torch.Tensor:
    """Preference-matching DPO: ``-log sigmoid(beta (log pi(y_w|x) - log pi(y_l|x)))``.

    The implicit reward of the PM objective is ``beta log pi`` plus a term in x alone; its optimum is the
    reward's Plackett-Luce distribution ``e^{r / beta}`` (Def. 3.2, Thm. 1), with no reference.
    """
    _check_beta(beta)
    return -F.logsigmoid(beta * (x.chosen - x.rejected))


def cpm_dpo(x: Pairs, *, beta: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Conditional PM-DPO: PM-DPO where ``pi_ref(y|x) >= alpha``, DPO's log-ratio where it is below (Def. 4.1).

    ``h(y) = log pi(y|x) - 1[pi_ref(y|x) < alpha] log pi_ref(y|x)``; loss ``-log sigmoid(beta (h_w - h_l))``.
    """
    _check_beta(beta)
    h_w, h_l = _conditional_h(x, alpha)
    return -F.logsigmoid(beta * (h_w - h_l))


def _conditional_h(x: Pairs, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_alpha = math.log(alpha)
    h_w = x.chosen - torch.where(x.ref_chosen < log_alpha, x.ref_chosen, torch.zeros_like(x.ref_chosen))
    h_l = x.rejected - torch.where(x.ref_rejected < log_alpha, x.ref_rejected, torch.zeros_like(x.ref_rejected))
    return h_w, h_l


# Each loss's implicit reward of the chosen and the rejected response, ``([N], [N])``, up to a term in x alone:
# what its Bradley-Terry model (or IPO's regression) compares, so that its accuracy and margin are its own.


def _log_ratio_reward(x: Pairs, *, beta: float, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO, cDPO, robust DPO: ``beta (log pi - log pi_ref)``."""
    return beta * (x.chosen - x.ref_chosen), beta * (x.rejected - x.ref_rejected)


def _per_token_log_ratio(x: Pairs, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """IPO: the per-token log-ratio its squared loss regresses to ``1 / (2 beta)``."""
    return (x.chosen - x.ref_chosen) / x.chosen_len.clamp(min=1), (x.rejected - x.ref_rejected) / x.rejected_len.clamp(
        min=1
    )


def _per_token_log_prob(x: Pairs, *, beta: float, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """SimPO: ``beta log pi / |y|`` (its margin gamma is a target, not part of the reward)."""
    return beta * x.chosen / x.chosen_len.clamp(min=1), beta * x.rejected / x.rejected_len.clamp(min=1)


def _log_prob_reward(x: Pairs, *, beta: float, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """PM-DPO: ``beta log pi``."""
    return beta * x.chosen, beta * x.rejected


def _conditional_reward(x: Pairs, *, beta: float, alpha: float, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional PM-DPO: ``beta h`` with Def. 4.1's ``h``."""
    h_w, h_l = _conditional_h(x, alpha)
    return beta * h_w, beta * h_l


@dataclass(frozen=True)
class DPOLoss:
    """A registered loss: ``fn(pairs, **hyperparameters) -> [N]``, and what it needs."""

    fn: Callable[..., torch.Tensor]
    needs_reference: bool  # whether it reads ``ref_chosen`` / ``ref_rejected``
    hyperparameters: tuple[str, ...]  # its keyword arguments, named as the DPO stage's config names them
    implicit_reward: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (pairs, **hyperparameters) -> (r_w, r_l)


DPO_LOSSES = {
    "sigmoid": DPOLoss(dpo_sigmoid, True, ("beta", "label_smoothing"), _log_ratio_reward),
    "robust": DPOLoss(dpo_robust, True, ("beta", "label_smoothing"), _log_ratio_reward),
    "ipo": DPOLoss(ipo, True, ("beta",), _per_token_log_ratio),
    "simpo": DPOLoss(simpo, False, ("beta", "simpo_gamma"), _per_token_log_prob),
    "pm": DPOLoss(pm_dpo, False, ("beta",), _log_prob_reward),
    "cpm": DPOLoss(cpm_dpo, True, ("beta", "alpha"), _conditional_reward),
}


def implicit_target(
    loss: str,
    reward: torch.Tensor,
    ref: torch.Tensor,
    beta: float,
    alpha: float = 0.0,
    *,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    preference: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy over a finite response set (``[..., k]``) that a loss's population minimiser reaches: the optimum
    it targets. Comparisons label ``i`` the winner over ``j`` with probability ``preference[..., i, j]`` (by
    default BTL in ``reward``) and show each pair as often as ``pair_weights`` says (by default all alike).
    Labels that are not BTL (a mixture of labeler groups) make the closed forms below hold at the BTL fit of
    the labels under those weights (``preference.btl_fit``), which replaces ``reward`` then.

    DPO (``sigmoid`` without label smoothing), PM-DPO and conditional PM-DPO have closed forms. The others are
    minimised numerically (``population_minimiser``): cDPO (``label_smoothing`` > 0) fits the smoothed labels
    ``p + eps (1 - 2 p)``, so its optimum is flatter than DPO's; robust DPO fits ``(p - eps) / (1 - 2 eps)``,
    unbounded where a pair's ``p`` lies outside ``[eps, 1 - eps]`` (NaN rows there); IPO and SimPO
    normalise log-probabilities by length, so their optimum depends on the policy's total mass on the set,
    taken here as 1. ``lengths`` (``[..., k]`` tokens) are needed by IPO and SimPO; ``mask`` marks the entries
    that exist (all by default).
    """
    from pmrlhf.objectives import optimal
    from pmrlhf.objectives.preference import btl_fit

    mask = torch.ones_like(reward, dtype=torch.bool) if mask is None else mask
    if preference is None:
        preference = torch.sigmoid(reward[..., :, None] - reward[..., None, :])
    else:
        weights = torch.ones_like(preference) if pair_weights is None else pair_weights
        reward = btl_fit(preference, weights, mask).to(reward.dtype)
    if loss == "sigmoid" and label_smoothing == 0:
        return optimal.kl_rlhf(reward, ref, beta)
    if loss == "pm":
        return optimal.max_entropy(reward, beta)
    if loss == "cpm":
        return optimal.conditional_pm(reward / beta, ref, alpha)
    if loss not in DPO_LOSSES:
        raise ValueError(f"no target for {loss!r}; known: {sorted(DPO_LOSSES)}")
    given = {"beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma, "alpha": alpha}
    kwargs = {k: given[k] for k in DPO_LOSSES[loss].hyperparameters}
    if loss in ("ipo", "simpo") and lengths is None:
        raise ValueError(f"the {loss} target needs the responses' lengths")
    unbounded = torch.zeros(reward.shape[:-1], dtype=torch.bool)
    if loss == "robust":
        p = preference
        pair = mask[..., :, None] & mask[..., None, :] & ~torch.eye(p.shape[-1], dtype=torch.bool)
        unbounded = (pair & ((p < label_smoothing) | (p > 1 - label_smoothing))).flatten(-2).any(-1)
    target = population_minimiser(
        loss, preference, ref, lengths, mask & ~unbounded[..., None], pair_weights=pair_weights, **kwargs
    )
    return torch.where(unbounded[..., None], float("nan"), target)


def population_minimiser(
    loss: str,
    preference: torch.Tensor,
    ref: torch.Tensor,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    iters: int = 400,
    pair_weights: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The policy over the set (softmax of free logits, so all its mass is on the set) that minimises the
    expected loss over every ordered pair ``(i, j)`` shown as often as ``pair_weights`` says (all alike by
    default), ``i`` labelled the winner with probability ``preference[..., i, j]``. L-BFGS in float64 on the
    registry's own loss function."""
    fn = DPO_LOSSES[loss].fn
    p, ref64 = preference.double(), ref.double()  # p: [..., k, k], P(i beats j)
    mask = torch.ones(p.shape[:-1], dtype=torch.bool) if mask is None else mask
    pair = mask[..., :, None] & mask[..., None, :] & ~torch.eye(p.shape[-1], dtype=torch.bool)
    w = torch.ones_like(p) if pair_weights is None else pair_weights.double()
    ref_logp = torch.log(ref64.clamp(min=1e-300))
    z = torch.zeros(p.shape[:-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [z], lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def winner(t):  # [..., k] -> [..., k, k]: entry (i, j) is t[i], the response labelled the winner
        return t[..., :, None].expand_as(p)

    def loser(t):
        return t[..., None, :].expand_as(p)

    length_pairs = (winner(lengths.double()), loser(lengths.double())) if lengths is not None else ()

    def expected_loss():
        opt.zero_grad()
        logp = torch.log_softmax(z.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)
        pairs = Pairs(winner(logp), loser(logp), winner(ref_logp), loser(ref_logp), *length_pairs)
        value = torch.where(pair, w * p * fn(pairs, **kwargs), 0.0).sum()
        value.backward()
        return value

    opt.step(expected_loss)
    with torch.no_grad():
        pi = torch.softmax(z.masked_fill(~mask, float("-inf")), -1)
    return pi.to(ref.dtype)
