"""f-divergence RLHF, Sec. 5.1: the optimum of ``E_pi[r] - beta D_f(pi || ref)`` over k responses, and the
paper's eq. (5.3), which is not that optimum's preference for any f but the reverse KL.

Shapes as in ``objectives.optimal``: rewards and reference probabilities ``[..., k]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pmrlhf.objectives.optimal import Regularizer


@dataclass(frozen=True)
class FDivergence:
    """A convex generator ``f`` with ``f(1) = 0`` and what the optimum needs of it.

    ``f_prime_inv(u)`` is ``(f')^{-1}(u)`` on ``u < f'(inf)`` (``sup_u``); below ``f'(0+)`` (``inf_u``) the
    optimal ratio ``pi / ref`` is 0. ``D_f(pi || ref) = sum_y ref(y) f(pi(y) / ref(y))`` (Sec. 5.1).
    """

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    f_prime_inv: Callable[[torch.Tensor], torch.Tensor]
    inf_u: float
    sup_u: float


def _alpha_divergence(a: float) -> FDivergence:
    if a in (0.0, 1.0):
        raise ValueError("alpha-divergence needs alpha not in {0, 1}: those limits are the two KLs")
    return FDivergence(
        name=f"alpha={a:g}",
        f=lambda t: (t**a - a * t - (1 - a)) / (a * (a - 1)),
        # f'(t) = (t^(a-1) - 1) / (a - 1)
        f_prime_inv=lambda u: (1 + (a - 1) * u) ** (1 / (a - 1)),
        inf_u=-1 / (a - 1) if a > 1 else -float("inf"),
        sup_u=-1 / (a - 1) if a < 1 else float("inf"),
    )


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1.0)), torch.zeros_like(t))


F_DIVERGENCES: dict[str, FDivergence] = {
    # reverse KL, KL(pi || ref): f(t) = t log t, f'(t) = log t + 1
    "reverse_kl": FDivergence("reverse_kl", _xlogx, lambda u: torch.exp(u - 1), -float("inf"), float("inf")),
    # forward KL, KL(ref || pi): f(t) = -log t, f'(t) = -1/t
    "forward_kl": FDivergence("forward_kl", lambda t: -torch.log(t), lambda u: -1 / u, -float("inf"), 0.0),
    # Jensen-Shannon, 0.5 KL(pi || m) + 0.5 KL(ref || m): f'(t) = 0.5 log(2t / (1 + t))
    "jensen_shannon": FDivergence(
        "jensen_shannon",
        lambda t: 0.5 * (_xlogx(t) - (1 + t) * torch.log((1 + t) / 2)),
        lambda u: torch.exp(2 * u) / (2 - torch.exp(2 * u)),
        -float("inf"),
        0.5 * math.log(2.0),
    ),
    # Pearson chi^2: f(t) = (t - 1)^2, f'(t) = 2 (t - 1); f'(0) = -2 is finite, so pi can hit 0.
    "chi2": FDivergence("chi2", lambda t: (t - 1) ** 2, lambda u: 1 + u / 2, -2.0, float("inf")),
    "alpha=0.5": _alpha_divergence(0.5),
    "alpha=2": _alpha_divergence(2.0),
}


def f_divergence(name: str, alpha: float | None = None) -> FDivergence:
    """Look up a generator by name; ``"alpha"`` with ``alpha=a`` builds any alpha-divergence."""
    if name == "alpha":
        if alpha is None:
            raise ValueError("the alpha-divergence needs alpha")
        return _alpha_divergence(alpha)
    try:
        return F_DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown f-divergence {name!r}; known: {sorted(F_DIVERGENCES)} and 'alpha'") from None


def f_divergence_rlhf(
    r: torch.Tensor, ref: torch.Tensor, beta: float, f: FDivergence | str, iters: int = 200
) -> torch.Tensor:
    """Optimum of ``E_pi[r] - beta D_f(pi || ref)`` (Sec. 5.1, the objective before eq. (5.3)).

    Stationarity gives ``pi_i = ref_i (f')^{-1}((r_i - mu) / beta)``, set to 0 where ``(r_i - mu)/beta`` is
    below ``f'(0+)`` (the KKT condition of ``pi_i >= 0``), with the multiplier ``mu`` chosen so the
    probabilities sum to one. The sum is decreasing in ``mu``; ``mu`` is found by bisection in float64.
    For reverse KL this is eq. (5.1). For any other f the binary preference it gives is *not* eq. (5.3)'s:
    ``eq_5_3_binary`` keeps the paper's formula for the comparison.
    """
    gen = f_divergence(f) if isinstance(f, str) else f
    r64, ref64 = r.double(), ref.double()

    def mass(mu: torch.Tensor) -> torch.Tensor:
        u = (r64 - mu) / beta
        ratio = gen.f_prime_inv(torch.clamp(u, max=_below(gen.sup_u)))
        ratio = torch.where(u <= gen.inf_u, torch.zeros_like(ratio), ratio)
        return ref64 * ratio

    # The mass is decreasing in mu. Bracket the root: at hi the mass is <= 1 (every ratio at or near 0),
    # at lo it is >= 1 (lo at the edge of (f')^{-1}'s domain, where the largest ratio diverges).
    rmax = r64.max(dim=-1, keepdim=True).values
    hi = rmax - beta * gen.inf_u if gen.inf_u > -float("inf") else rmax + beta
    lo = rmax - beta * _below(gen.sup_u) if gen.sup_u < float("inf") else rmax - beta
    hi, lo = _expand(hi, mass, too_big=True, step=beta), _expand(lo, mass, too_big=False, step=-beta)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = mass(mid).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    pi = mass((lo + hi) / 2)
    return (pi / pi.sum(-1, keepdim=True)).to(r.dtype)


def eq_5_3_binary(r: torch.Tensor, ref: torch.Tensor, beta: float, f: FDivergence | str) -> torch.Tensor:
    """The paper's eq. (5.3) for two responses (``r``, ``ref``: ``[..., 2]``): ``p_rlhf^f(y1)`` as it states it,
    ``p_ref(y1) p_reward^f(y1) / sum_i p_ref(y_i) p_reward^f(y_i)`` with
    ``p_reward^f(y_i) ∝ (f')^{-1}(r_i / beta)``.

    **This is not the optimum's preference for any f but reverse KL.** The optimum is
    ``pi_i = ref_i (f')^{-1}((r_i - mu) / beta)`` (``f_divergence_rlhf``), and the multiplier ``mu`` cancels from
    the ratio ``pi_1 / pi_2`` only when ``(f')^{-1}`` is exponential. For chi^2 with ``r = (1, 0)``, a uniform
    reference and ``beta = 1``, the optimum prefers y1 with probability 0.625 (``mu = 0.5``), eq. (5.3) says
    0.600. The paper's conclusion (the bias stays unless f is the KL) holds for the true optimum as well
    (``tests/test_optimal.py``). Kept so that the statement can be checked, not for use. Rewards with
    ``r / beta`` outside the domain of ``(f')^{-1}`` (``(inf_u, sup_u)``) have no such formula: refused.
    """
    gen = f_divergence(f) if isinstance(f, str) else f
    u = r.double() / beta
    if bool(((u <= gen.inf_u) | (u >= gen.sup_u)).any()):
        raise ValueError(
            f"eq. (5.3) needs r / beta in ({gen.inf_u:g}, {gen.sup_u:g}), the domain of (f')^-1, for this f; got "
            f"values from {u.min().item():g} to {u.max().item():g}"
        )
    w = gen.f_prime_inv(u)
    p_reward = w / w.sum(-1, keepdim=True)
    p_ref = ref.double() / ref.double().sum(-1, keepdim=True)
    joint = p_ref * p_reward
    return (joint[..., 0] / joint.sum(-1)).to(r.dtype)


def _expand(mu: torch.Tensor, mass: Callable[[torch.Tensor], torch.Tensor], too_big: bool, step: float) -> torch.Tensor:
    """Move ``mu`` by doubling steps until ``sum(mass(mu))`` is on the wanted side of one."""
    for _ in range(200):
        total = mass(mu).sum(-1, keepdim=True)
        wrong = total > 1 if too_big else total < 1
        if not bool(wrong.any()):
            return mu
        mu = torch.where(wrong, mu + step, mu)
        step *= 2
    raise RuntimeError("f_divergence_rlhf could not bracket the normaliser")


def _below(u: float) -> float:
    """The largest float64 strictly below ``u`` (the edge of ``(f')^{-1}``'s domain), or ``u`` if infinite."""
    if u == float("inf"):
        return u
    return torch.nextafter(torch.tensor(u, dtype=torch.float64), torch.tensor(-1e300, dtype=torch.float64)).item()


def f_divergence_regularizer(beta: float, f: FDivergence | str) -> Regularizer:
    """``R_i(pi) = -beta ref_i f(pi / ref_i) / pi``: the f-divergence penalty written in the form of (3.12)."""
    gen = f_divergence(f) if isinstance(f, str) else f
    return lambda pi, ref: -beta * ref * gen.f(pi / ref) / pi
