"""The DPO family and its preference-matching counterpart, as losses on sequence log-probabilities.

Every loss takes, for N comparisons (y_w preferred to y_l), the policy's sequence log-probabilities
``chosen``/``rejected`` ``[N]``, the reference's ``ref_chosen``/``ref_rejected`` ``[N]`` and, where a loss
needs them, the response lengths in tokens; it returns the per-comparison loss ``[N]`` (take ``.mean()``).

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

import torch
import torch.nn.functional as F


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")


def dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO, and with ``label_smoothing = eps`` conservative DPO (the textbook chapter's cDPO):
    ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``, ``delta = h_w - h_l``."""
    _check_beta(beta)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def dpo_robust(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al., 2024): an unbiased loss under label-flip rate ``eps`` < 0.5,
    ``[-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)] / (1 - 2 eps)``."""
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta: float = 0.1):
    """IPO (Azar et al., 2024, eq. 17): ``(delta - 1 / (2 beta))^2`` with per-token log-ratios
    (``h / length``), the normalisation the IPO authors use and TRL follows."""
    _check_beta(beta)
    delta = (chosen - ref_chosen) / chosen_len.clamp(min=1) - (rejected - ref_rejected) / rejected_len.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def simpo(chosen, rejected, chosen_len, rejected_len, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin gamma:
    ``-log sigmoid(beta (log pi_w / |y_w| - log pi_l / |y_l|) - gamma)``."""
    _check_beta(beta)
    delta = chosen / chosen_len.clamp(min=1) - rejected / rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * delta - gamma)


def pm_dpo(chosen, rejected, beta: float = 1.0):
    """Preference-matching DPO: ``-log sigmoid(beta (log pi(y_w|x) - log pi(y_l|x)))``.

    The implicit reward of the PM objective is ``beta log pi`` plus a term in x alone; its optimum is the
    reward's Plackett-Luce distribution ``e^{r / beta}`` (Def. 3.2, Thm. 1), with no reference.
    """
    _check_beta(beta)
    return -F.logsigmoid(beta * (chosen - rejected))


def cpm_dpo(chosen, rejected, ref_chosen, ref_rejected, beta: float = 1.0, alpha: float = 0.1):
    """Conditional PM-DPO: PM-DPO where ``pi_ref(y|x) >= alpha``, DPO's log-ratio where it is below (Def. 4.1).

    ``h(y) = log pi(y|x) - 1[pi_ref(y|x) < alpha] log pi_ref(y|x)``; loss ``-log sigmoid(beta (h_w - h_l))``.
    """
    _check_beta(beta)
    log_alpha = math.log(alpha)
    h_w = chosen - torch.where(ref_chosen < log_alpha, ref_chosen, torch.zeros_like(ref_chosen))
    h_l = rejected - torch.where(ref_rejected < log_alpha, ref_rejected, torch.zeros_like(ref_rejected))
    return -F.logsigmoid(beta * (h_w - h_l))


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
) -> torch.Tensor:
    """The policy over a finite response set (``[..., k]``) that a loss's population minimiser reaches when
    comparisons are BTL with ``reward`` and every pair is compared equally often: the optimum it targets.

    DPO (``sigmoid`` without label smoothing), PM-DPO and conditional PM-DPO have closed forms. The others are
    minimised numerically (``population_minimiser``): cDPO (``label_smoothing`` > 0) fits the smoothed labels
    ``p + eps (1 - 2 p)``, so its optimum is flatter than DPO's; robust DPO fits ``(p - eps) / (1 - 2 eps)``,
    unbounded where a pair's ``p`` lies outside ``[eps, 1 - eps]`` (NaN rows there); IPO and SimPO
    normalise log-probabilities by length, so their optimum depends on the policy's total mass on the set,
    taken here as 1. ``lengths`` (``[..., k]`` tokens) are needed by IPO and SimPO; ``mask`` marks the entries
    that exist (all by default).
    """
    from pmrlhf.objectives import optimal

    if loss == "sigmoid" and label_smoothing == 0:
        return optimal.kl_rlhf(reward, ref, beta)
    if loss == "pm":
        return optimal.max_entropy(reward, beta)
    if loss == "cpm":
        return optimal.conditional_pm(reward / beta, ref, alpha)
    if loss not in DPO_LOSSES:
        raise ValueError(f"no target for {loss!r}; known: {sorted(DPO_LOSSES)}")
    kwargs = {"beta": beta}
    if loss in ("sigmoid", "robust"):
        kwargs["label_smoothing"] = label_smoothing
    if loss == "simpo":
        kwargs["gamma"] = simpo_gamma
    if loss in ("ipo", "simpo") and lengths is None:
        raise ValueError(f"the {loss} target needs the responses' lengths")
    mask = torch.ones_like(reward, dtype=torch.bool) if mask is None else mask
    unbounded = torch.zeros(reward.shape[:-1], dtype=torch.bool)
    if loss == "robust":
        p = torch.sigmoid(reward[..., :, None] - reward[..., None, :])
        pair = mask[..., :, None] & mask[..., None, :]
        unbounded = (pair & ((p < label_smoothing) | (p > 1 - label_smoothing))).flatten(-2).any(-1)
    target = population_minimiser(loss, reward, ref, lengths, mask & ~unbounded[..., None], **kwargs)
    return torch.where(unbounded[..., None], float("nan"), target)


def population_minimiser(
    loss: str,
    reward: torch.Tensor,
    ref: torch.Tensor,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    iters: int = 400,
    **kwargs,
) -> torch.Tensor:
    """The policy over the set (softmax of free logits, so all its mass is on the set) that minimises the
    expected loss over every ordered pair ``(i, j)``, ``i`` labelled the winner with probability
    ``sigmoid(reward_i - reward_j)``. L-BFGS in float64 on the registry's own loss function."""
    fn = DPO_LOSSES[loss]
    r, ref64 = reward.double(), ref.double()
    mask = torch.ones_like(r, dtype=torch.bool) if mask is None else mask
    pair = mask[..., :, None] & mask[..., None, :] & ~torch.eye(r.shape[-1], dtype=torch.bool)
    p = torch.sigmoid(r[..., :, None] - r[..., None, :])  # [..., k, k]: P(i beats j)
    ref_logp = torch.log(ref64.clamp(min=1e-300))
    z = torch.zeros_like(r, requires_grad=True)
    opt = torch.optim.LBFGS(
        [z], lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def expected_loss():
        opt.zero_grad()
        logp = torch.log_softmax(z.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)
        c, rj = logp[..., :, None].expand_as(p), logp[..., None, :].expand_as(p)
        rc, rr = ref_logp[..., :, None].expand_as(p), ref_logp[..., None, :].expand_as(p)
        args = {"sigmoid": (c, rj, rc, rr), "robust": (c, rj, rc, rr), "pm": (c, rj), "cpm": (c, rj, rc, rr)}
        if loss in ("ipo", "simpo"):
            lc, lr = lengths.double()[..., :, None].expand_as(p), lengths.double()[..., None, :].expand_as(p)
            args["ipo"], args["simpo"] = (c, rj, rc, rr, lc, lr), (c, rj, lc, lr)
        value = torch.where(pair, p * fn(*args[loss], **kwargs), 0.0).sum()
        value.backward()
        return value

    opt.step(expected_loss)
    with torch.no_grad():
        pi = torch.softmax(z.masked_fill(~mask, float("-inf")), -1)
    return pi.to(reward.dtype)


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "robust": dpo_robust, "ipo": ipo, "simpo": simpo, "pm": pm_dpo, "cpm": cpm_dpo}
