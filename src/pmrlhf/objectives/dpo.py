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


def implicit_target(loss: str, reward: torch.Tensor, ref: torch.Tensor, beta: float, alpha: float = 0.0):
    """The policy over a finite response set that a loss's population minimiser reaches when comparisons are
    BTL with ``reward`` (``[..., k]``) and every pair is compared: the closed form it targets."""
    from pmrlhf.objectives import optimal

    if loss == "sigmoid":
        return optimal.kl_rlhf(reward, ref, beta)
    if loss == "pm":
        return optimal.max_entropy(reward, beta)
    if loss == "cpm":
        return optimal.conditional_pm(reward / beta, ref, alpha)
    raise ValueError(f"no closed-form target for {loss!r}")


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "robust": dpo_robust, "ipo": ipo, "simpo": simpo, "pm": pm_dpo, "cpm": cpm_dpo}
