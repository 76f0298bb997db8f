"""Per-token penalties for RL fine-tuning: what the reward is reduced by at each response token.

Every penalty takes per-token log-probabilities of the sampled tokens under the policy (``logp``) and
the reference (``ref_logp``), and the response mask, all ``[B, T]``, and returns the per-token penalty
``[B, T]`` (0 where the mask is 0), before the coefficient. A stage shapes its rewards as
``reward_t = -coef * penalty_t`` plus the score at the last token. With reward-to-go credit (GAE with
``gamma = 1``, RLOO, group mean) the expected policy-gradient update is then the exact gradient of

    E_{y ~ pi}[ r(x, y) ] - coef * E_{y ~ pi}[ regulariser(y) ]

with the sequence-level regulariser each penalty names (its registry entry states each as a formula;
``tests/test_objectives_exact.py`` checks the claim by enumeration for every penalty and estimator):

* ``kl``  -> ``log pi(y|x) - log pi_ref(y|x)``, the KL term of eq. (2.3);
* ``pm``  -> ``log pi(y|x)``, the PM regulariser of eq. (3.10);
* ``cpm_sequence`` -> Def. 4.1: ``log pi(y|x) - 1[pi_ref(y|x) < alpha] log pi_ref(y|x)``;
* ``cpm_token``    -> the reference code's rule: ``sum_t log pi(T_t) - 1[pi_ref(T_t) < alpha] log pi_ref(T_t)``;
* ``cpm_mean``     -> Def. 4.1 on the length-normalised reference probability:
  ``log pi(y|x) - 1[mean_t log pi_ref(T_t) < log alpha] log pi_ref(y|x)``;
* ``cpm_prefix``   -> per token, on the prefix's reference probability:
  ``sum_t log pi(T_t) - 1[pi_ref(T_<=t | x) < alpha] log pi_ref(T_t)``;
* ``maxent`` -> ``tau log pi(y|x)``.

That needs each token's penalty to be fixed by the tokens up to it: reward-to-go credits token t with the
penalties from t on only. A penalty that depends on tokens after t (as Def. 4.1's condition on the whole
response does) must sit on the last token, where every token is already chosen.

``PENALTIES`` is the registry: each name's ``PenaltyRule`` holds the per-token penalty, its regulariser, its
family and its hyperparameters (``alpha``, ``tau``: keyword arguments of both). Everything else (the PPO config,
the objective a run records, evaluation, the study, the report) reads a penalty from its entry, so a new one is a
function and an entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Penalty = Callable[..., torch.Tensor]


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` booleans, True at the last response token of each row (the response tokens contiguous)."""
    T = mask.shape[-1]
    last = (torch.arange(T, device=mask.device) * mask.long()).argmax(-1, keepdim=True)  # [B, 1]
    return (torch.arange(T, device=mask.device) == last) & mask.bool()


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log pi(T_t) - log pi_ref(T_t)`` (Schulman's k1): summed over a response, the log-ratio of eq. (2.3).

    The other estimators of KL(pi || pi_ref), k2 and k3, are not KL penalties when used as a reward: a reward
    ``-coef * k3`` has the policy gradient of ``E r - coef KL(pi || pi_ref) + coef KL(pi_ref || pi)``. They
    belong in the loss, differentiated (``rl.kl_loss``).
    """
    return _masked(logp - ref_logp, mask)


def pm(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log pi(T_t | T_<t, x)``: summed over a response, the PM regulariser ``log pi(y|x)`` of eq. (3.10)."""
    return _masked(logp, mask)


def cpm_token(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM, per token, as the paper's reference code applies it.

    ``log pi(T_t)`` where ``pi_ref(T_t) >= alpha``, else ``log pi(T_t) - log pi_ref(T_t)``: the condition of
    Def. 4.1 tested on each token's reference probability instead of on the whole response's. Each token's
    penalty depends on that token alone, so it can stay where it is.
    """
    _check_alpha(alpha)
    in_m = ref_logp >= math.log(alpha)
    return _masked(torch.where(in_m, logp, logp - ref_logp), mask)


def cpm_sequence(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM as Def. 4.1 states it: the condition ``pi_ref(y|x) >= alpha`` on the whole response.

    ``log pi(T_t)`` on every token, and on the last token also ``-log pi_ref(y|x)`` when ``pi_ref(y|x) < alpha``.
    Summed over the response this is Def. 4.1's regulariser. The condition depends on every token of the
    response, so its term sits on the last one: spread over the tokens (``log pi - log pi_ref`` on each token
    of a response off M(x)), token t would be credited with a term that tokens after it decide, and the
    expected update under reward-to-go credit would miss Def. 4.1's gradient (by 2e-3 on the two-token example
    of ``tests/test_objectives_exact.py``, where the rule here agrees with it to 1e-15).
    """
    _check_alpha(alpha)
    seq_ref = _masked(ref_logp, mask).sum(-1, keepdim=True)  # [B, 1]
    correction = torch.where(seq_ref < math.log(alpha), -seq_ref, torch.zeros_like(seq_ref))
    return _masked(logp, mask) + torch.where(_last_token(mask), correction, torch.zeros_like(logp))


def cpm_mean(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Def. 4.1 with the condition on the response's geometric-mean token probability: ``pi_ref(y|x)^(1/|y|) >=
    alpha``, i.e. the mean of its tokens' ``log pi_ref`` at least ``log alpha``.

    Def. 4.1's ``pi_ref(y|x) >= alpha`` cannot be set on real text: a 200-token answer has ``pi_ref`` near
    e^-150 however natural it is, so any alpha that admits it admits everything shorter. The per-token mean does
    not fall with length: an LM's natural text has a mean near its per-token entropy's exponent whatever its
    length. Like ``cpm_sequence`` the condition depends on every token, so its term sits on the last one.
    """
    _check_alpha(alpha)
    seq_ref = _masked(ref_logp, mask).sum(-1, keepdim=True)
    mean_ref = seq_ref / mask.sum(-1, keepdim=True).clamp(min=1)
    correction = torch.where(mean_ref < math.log(alpha), -seq_ref, torch.zeros_like(seq_ref))
    return _masked(logp, mask) + torch.where(_last_token(mask), correction, torch.zeros_like(logp))


def cpm_prefix(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM per token, on the reference probability of the response so far: ``log pi(T_t)`` while
    ``pi_ref(T_1..T_t | x) >= alpha``, ``log pi(T_t) - log pi_ref(T_t)`` from the first token where it drops below.

    The prefix probability only falls, so the KL form applies to a suffix of the response: from the point where
    it leaves what the reference writes with probability alpha. A response whose whole ``pi_ref(y|x) >= alpha``
    is PM-regularised throughout, as Def. 4.1 has it; one off that set keeps ``e^r`` times the reference's
    probability of its tail after the split, where Def. 4.1 keeps ``pi_ref(y|x) e^r``. Unlike Def. 4.1's rule,
    each token's penalty is fixed by the tokens up to it, so it stays on its token (no term on the last one)
    and the condition never switches on and off inside a response, as the per-token rule's does.
    """
    _check_alpha(alpha)
    prefix = torch.cumsum(_masked(ref_logp, mask), -1)
    return _masked(torch.where(prefix >= math.log(alpha), logp, logp - ref_logp), mask)


def cpm_running(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Conditional PM per token, on the running mean of the reference's token log-probabilities: ``log pi(T_t)``
    while ``(1/t) sum_{s<=t} log pi_ref(T_s) >= log alpha``, ``log pi(T_t) - log pi_ref(T_t)`` where it is below.

    The prefix rule's threshold is a probability of the whole prefix, which on real text falls below any fixed
    alpha within a few tokens however natural the text; the running mean does not decay with length, so one
    alpha means the same at the 5th token and the 500th (alpha is a geometric-mean token probability, as in
    ``cpm_mean``). Causal like the prefix rule: each token's penalty is fixed by the tokens up to it, so it stays
    on its token. Unlike the prefix rule the condition can switch back: a response that recovers after an
    unlikely stretch is PM-regularised again.
    """
    _check_alpha(alpha)
    return _masked(torch.where(_running_ref(ref_logp, mask) >= math.log(alpha), logp, logp - ref_logp), mask)


def maxent(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau * log pi(T_t)``: maximum-entropy RL; ``tau = 1`` is PM RLHF (3.10), other ``tau`` are not PM."""
    return _masked(tau * logp, mask)


def _log(alpha: float) -> float:
    """``log alpha``; alpha 0 (the paper's switch to unconditional PM) exempts every response."""
    return math.log(alpha) if alpha > 0 else -math.inf


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


def _seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(x, mask).sum(-1)


def _prefix_ref(ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log pi_ref(T_1..T_t | x)`` at each token t of the response."""
    return torch.cumsum(_masked(ref_logp, mask), -1)


def _running_ref(ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``log pi_ref`` over the response's tokens up to each token t."""
    return _prefix_ref(ref_logp, mask) / torch.cumsum(mask.to(ref_logp.dtype), -1).clamp(min=1)


FAMILIES = ("kl", "pm", "conditional", "maxent")


@dataclass(frozen=True)
class PenaltyRule:
    """A registered penalty. ``regularizer`` is the sequence-level regulariser it optimises, ``(logp, ref_logp,
    mask, **hyperparameters) -> [B]``, written out from its definition rather than by summing the penalty (the
    enumeration test checks the two against each other). ``family``: ``kl`` (keeps ``log pi_ref``: its optimum
    inherits the reference's bias, Thm. 3.1), ``pm`` (preference matching, eq. (3.10)), ``conditional`` (PM where
    the reference is above ``alpha``, KL elsewhere: Def. 4.1 and its variants) or ``maxent``; every family but
    ``kl`` matches the whole distribution, so it is refused with truncated sampling. ``hyperparameters``: names
    and defaults of its keyword arguments."""

    penalty: Penalty
    regularizer: Callable[..., torch.Tensor]
    family: str
    hyperparameters: dict[str, float] = field(default_factory=dict)
    default_coef: float = 1.0  # the coefficient where none is given (the paper's kl_ctl 0.1, ent_ctl 1)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def kwargs(self, given: Mapping[str, float | None]) -> dict[str, float]:
        """Its keyword arguments: each hyperparameter's value in ``given`` (a config, a recorded objective), else
        its default."""
        return {k: float(v if given.get(k) is None else given[k]) for k, v in self.hyperparameters.items()}


PENALTIES: dict[str, PenaltyRule] = {
    "kl": PenaltyRule(kl, lambda logp, ref_logp, mask: _seq(logp, mask) - _seq(ref_logp, mask), "kl", {}, 0.1),
    "pm": PenaltyRule(pm, lambda logp, ref_logp, mask: _seq(logp, mask), "pm"),
    "cpm_token": PenaltyRule(
        cpm_token,
        lambda logp, ref_logp, mask, alpha: (
            _seq(logp, mask) - _seq(torch.where(ref_logp < _log(alpha), ref_logp, 0.0), mask)
        ),
        "conditional",
        {"alpha": 0.3},
    ),
    "cpm_sequence": PenaltyRule(
        cpm_sequence,
        lambda logp, ref_logp, mask, alpha: (
            _seq(logp, mask) - torch.where(_seq(ref_logp, mask) < _log(alpha), _seq(ref_logp, mask), 0.0)
        ),
        "conditional",
        {"alpha": 0.3},
    ),
    "cpm_mean": PenaltyRule(
        cpm_mean,
        lambda logp, ref_logp, mask, alpha: (
            _seq(logp, mask) - torch.where(_seq(ref_logp, mask) < _log(alpha) * mask.sum(-1), _seq(ref_logp, mask), 0.0)
        ),
        "conditional",
        {"alpha": 0.3},
    ),
    "cpm_prefix": PenaltyRule(
        cpm_prefix,
        lambda logp, ref_logp, mask, alpha: (
            _seq(logp, mask) - _seq(torch.where(_prefix_ref(ref_logp, mask) < _log(alpha), ref_logp, 0.0), mask)
        ),
        "conditional",
        {"alpha": 0.3},
    ),
    "cpm_running": PenaltyRule(
        cpm_running,
        lambda logp, ref_logp, mask, alpha: (
            _seq(logp, mask) - _seq(torch.where(_running_ref(ref_logp, mask) < _log(alpha), ref_logp, 0.0), mask)
        ),
        "conditional",
        {"alpha": 0.3},
    ),
    "maxent": PenaltyRule(maxent, lambda logp, ref_logp, mask, tau: tau * _seq(logp, mask), "maxent", {"tau": 1.0}),
}


def get_penalty(name: str) -> PenaltyRule:
    """The penalty registered under ``name``, with a clear error for an unknown one."""
    try:
        return PENALTIES[name]
    except KeyError:
        raise ValueError(f"unknown penalty {name!r}; known: {sorted(PENALTIES)}") from None


def optimum_terms(name: str, ref_logp: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, c)``, ``[B]`` each, of a penalty whose regulariser is ``s log pi(y|x) - c(y)`` (every registered one
    is, as the enumeration test checks): ``c`` is the part of ``log pi_ref(y|x)`` it keeps (all of it for kl, none
    for pm, what each conditional rule's condition selects) and ``s`` the weight of ``log pi`` (maxent's ``tau``,
    else 1). The optimum of ``E r - coef E[regulariser]`` is then ``e^{(r / coef + c(y)) / s}`` normalised
    (``optimal.pm_with_reference``)."""
    regularizer = get_penalty(name).regularizer
    zeros = torch.zeros_like(ref_logp)
    c = -regularizer(zeros, ref_logp, mask, **kwargs)
    s = regularizer(mask.to(ref_logp.dtype) / mask.sum(-1, keepdim=True).clamp(min=1), ref_logp, mask, **kwargs) + c
    return s, c
