"""Per-token penalties for RL fine-tuning: what the reward is reduced by at each response token.

Every penalty takes per-token log-probabilities of the sampled tokens under the policy (``logp``) and
the reference (``ref_logp``), and the response mask, all ``[B, T]``, and returns the per-token penalty
``[B, T]`` (0 where the mask is 0), before the coefficient. A stage shapes its rewards as
``reward_t = -coef * penalty_t`` plus the score at the last token, so summing a penalty over the tokens of
a response gives the sequence-level regulariser of the paper:

* ``kl``  -> ``log pi(y|x) - log pi_ref(y|x)``, the KL term of eq. (2.3) (k1 estimator);
* ``pm``  -> ``log pi(y|x)``, the PM regulariser of eq. (3.10);
* ``cpm_sequence`` -> Def. 4.1 literally;
* ``cpm_token``    -> the reference code's per-token reading of Def. 4.1.

Look penalties up by name in ``PENALTIES``; extra parameters (``alpha``, ``estimator``, ``tau``) are
keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Penalty = Callable[..., torch.Tensor]


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (Schulman, "Approximating KL").

    With ``log_ratio = logp - ref_logp``:
    ``k1 = log_ratio`` (unbiased, its sum is the sequence log-ratio of eq. (2.3));
    ``k2 = log_ratio**2 / 2`` (biased, low variance, never negative);
    ``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased, never negative).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        value = log_ratio
    elif estimator == "k2":
        value = log_ratio.pow(2) / 2
    elif estimator == "k3":
        value = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")
    return _masked(value, mask)


def pm(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log pi(T_t | T_<t, x)``: summed over a response, the PM regulariser ``log pi(y|x)`` of eq. (3.10)."""
    return _masked(logp, mask)


def cpm_token(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM, per token, as the paper's reference code applies it.

    ``log pi(T_t)`` where ``pi_ref(T_t) >= alpha``, else ``log pi(T_t) - log pi_ref(T_t)``: the condition of
    Def. 4.1 tested on each token's reference probability instead of on the whole response's.
    """
    _check_alpha(alpha)
    in_m = ref_logp >= math.log(alpha)
    return _masked(torch.where(in_m, logp, logp - ref_logp), mask)


def cpm_sequence(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM as Def. 4.1 states it: the condition ``pi_ref(y|x) >= alpha`` on the whole response.

    Every token of a response with ``pi_ref(y|x) >= alpha`` gets ``log pi(T_t)``; every token of any other
    response gets ``log pi(T_t) - log pi_ref(T_t)``. Summed over the response this is exactly the
    regulariser of Def. 4.1.
    """
    _check_alpha(alpha)
    seq_ref = _masked(ref_logp, mask).sum(-1, keepdim=True)  # [B, 1]
    in_m = seq_ref >= math.log(alpha)
    return _masked(torch.where(in_m, logp, logp - ref_logp), mask)


def maxent(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau * log pi(T_t)``: maximum-entropy RL; ``tau = 1`` is PM RLHF (3.10), other ``tau`` are not PM."""
    return _masked(tau * logp, mask)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


PENALTIES: dict[str, Penalty] = {
    "kl": kl,
    "pm": pm,
    "cpm_token": cpm_token,
    "cpm_sequence": cpm_sequence,
    "cpm": cpm_token,
    "maxent": maxent,
}


def get_penalty(name: str) -> Penalty:
    """The penalty registered under ``name``, with a clear error for an unknown one."""
    try:
        return PENALTIES[name]
    except KeyError:
        raise ValueError(f"unknown penalty {name!r}; known: {sorted(PENALTIES)}") from None
