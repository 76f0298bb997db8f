"""Closed-form optimal policies over a finite set of k responses to one prompt.

Every function takes rewards ``r`` of shape ``[..., k]`` (and, where it applies, reference probabilities
``ref`` of the same shape) and returns the optimal policy's probabilities, shape ``[..., k]``. This is the
setting of the paper's Sec. 3.1: under Hypotheses 3.1 (expressivity) and 3.2 (exact optimisation) the
aligned model *is* the maximiser of ``sum_i pi_i (r_i + R(pi_i))`` over the simplex, eq. (3.5) / (3.12).

``solve`` maximises that objective numerically for any regulariser, so every closed form here can be
checked against it.

Equation numbers refer to Xiao et al. (2024), *On the Algorithmic Bias of Aligning Large Language Models
with RLHF: Preference Collapse and Matching Regularization*.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Regularizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``R(pi, ref) -> values``: the per-response regulariser R_i(pi_i) of eq. (3.12), elementwise."""


def preference_matching(r: torch.Tensor) -> torch.Tensor:
    """The PM policy of Def. 3.2, eq. (3.2): ``pi(y|x) = e^{r(x,y)} / sum_y' e^{r(x,y')}``."""
    return torch.softmax(r, dim=-1)


def kl_rlhf(r: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Optimum of KL-regularised RLHF, eq. (2.3); Prop. 5.1, eq. (5.1).

    ``pi_rlhf(y|x) = ref(y|x) e^{r/beta} / sum_j ref(y_j|x) e^{r_j/beta}``. Responses with ``ref = 0`` get
    probability 0 whatever their reward: the preference collapse of Sec. 5.2.
    """
    return torch.softmax(r / beta + torch.log(ref), dim=-1)


def max_entropy(r: torch.Tensor, tau: float) -> torch.Tensor:
    """Optimum of ``E_pi[r] + tau * H(pi)``: ``softmax(r / tau)``.

    PM RLHF (3.10) is the case ``tau = 1``; any other ``tau`` is not preference-matching (Table 1).
    """
    return torch.softmax(r / tau, dim=-1)


def conditional_pm(r: torch.Tensor, ref: torch.Tensor, alpha: float) -> torch.Tensor:
    """Optimum of conditional PM RLHF, eq. (4.1) with ``eps(x,y) = ref(y|x)`` and ``M(x) = {ref >= alpha}``.

    Sec. 4.2 / Def. 4.1. By Thm. 4 (proof in App. B.2) the optimum is proportional to ``e^{r}`` on M(x) and to
    ``ref * e^{r}`` off it, so that conditional on M(x) it equals the reward model's Plackett-Luce
    distribution for any ``alpha``.
    """
    in_m = ref >= alpha
    weight = torch.where(in_m, torch.zeros_like(ref), torch.log(ref))
    return torch.softmax(r + weight, dim=-1)


def generalized_pl(r: torch.Tensor, g: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The generalised Plackett-Luce distribution of Sec. 3.4: ``g(r_i) / sum_j g(r_j)``, g positive."""
    w = g(r)
    if bool((w <= 0).any()):
        raise ValueError("generalized_pl needs g(r) > 0 for every reward")
    return w / w.sum(dim=-1, keepdim=True)


def thm3_regularizer(
    g_inv: Callable[[torch.Tensor], torch.Tensor],
    G: Callable[[torch.Tensor], torch.Tensor],
    c1: float = 0.0,
    c2: float = 0.0,
) -> Regularizer:
    """The regulariser exactly as Thm. 3 / eq. (3.14) states it: ``-g^{-1}(pi) + C1 + (G(g^{-1}(pi)) + C2) / pi``.

    **This is not preference-matching in general.** The derivation in App. B.1 writes
    ``r_i = g^{-1}(pi_i) + c`` from ``pi_i = g(r_i) / S``; that step holds only when ``g^{-1}(pi S)`` splits into
    a function of ``pi`` plus a function of ``S``, i.e. for ``g(r) = a e^{r/s}``. For those g (the PL model and
    its temperature-scaled versions) eq. (3.14) is right; for ``g(r) = r`` or ``g(r) = r**2`` its optimum is
    not ``generalized_pl(r, g)`` (see ``tests/test_optimal.py``). Use ``generalized_pm_regularizer`` for the
    regulariser that does match. Kept so that the paper's statement can be checked, not for training.
    """

    def R(pi: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        u = g_inv(pi)
        return -u + c1 + (G(u) + c2) / pi

    return R


def generalized_pm_regularizer(
    g_inv: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor, g_inf: float = 0.0
) -> Regularizer:
    """A regulariser whose optimum *is* ``generalized_pl(r, g)``, for any positive increasing g.

    The first-order condition of (3.5) at ``pi_i = g(r_i) / S`` with ``S = sum_j g(r_j)`` is
    ``(pi R(pi))' = -g^{-1}(S pi) + const``, so ``R(pi) = -(1/pi) int_{t0}^pi g^{-1}(S t) dt``. Its ``pi R`` is
    strictly concave (g increasing), so that stationary point is the global maximum. Unlike eq. (3.14), R
    depends on the prompt through ``S(x) = sum_y g(r(x, y))`` (``scale``, shape ``[..., 1]``): a PM regulariser
    for a non-exponential g must know the reward model's normaliser. For ``g = exp`` it reduces to
    ``-log pi + 1 - log S``, i.e. Thm. 1 with ``C1 = 1 - log S``.

    ``g_inf`` is the infimum of g (0 for ``e^r``, ``r``, ``r^2`` on positive rewards; 1 for ``1 + e^r``):
    ``g^{-1}`` is defined above it only, so the integral starts at ``t0 = g_inf / S``, and no reward gives a
    probability below ``t0``. There ``pi R`` continues as a line with the slope it has just above ``t0`` (very
    steep, as ``g^{-1}`` falls to -inf at ``g_inf``), which keeps ``pi R`` concave and the optimum above ``t0``.

    The integral is taken with 64-point Gauss-Legendre quadrature after ``t = t0 + (pi - t0) s^2``, exact to
    rounding for ``g^{-1}`` polynomial in ``sqrt(t)`` of degree < 127 (``g(r) = r``, ``r^2``) and accurate to
    ~1e-10 for the smooth ones used in practice.
    """
    nodes, weights = _gauss_legendre(64)
    s = (nodes + 1) / 2  # quadrature points on (0, 1)

    def R(pi: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # int_t0^u h(t) dt = int_0^1 h(t0 + (u - t0) s^2) 2 (u - t0) s ds: the substitution smooths the
        # t^(1/2)-type singularities at t0 that g^{-1} often has (g(r) = r^2 gives g^{-1} = sqrt).
        s_ = s.to(pi)
        S = scale.to(pi)
        t0 = g_inf / S
        edge = t0 * (1 + 1e-6) if g_inf > 0 else t0  # S * t near 1 + 1e-6 s^2 stays above g_inf in float64
        u = torch.maximum(pi, edge)
        t = t0.unsqueeze(-1) + (u - t0).unsqueeze(-1) * s_**2  # [..., k, n]
        h = g_inv(S.unsqueeze(-1) * t)
        if bool(torch.isnan(h).any()):
            raise ValueError(
                f"g_inv is undefined on part of (g_inf, S], g_inf = {g_inf}: pass g_inf, the infimum of g "
                "(1 for g = 1 + e^r)"
            )
        integral = (h * 2 * s_ * weights.to(pi)).sum(-1) * (u - t0) / 2
        below = (u - pi) * g_inv(S * edge) if g_inf > 0 else 0.0  # the line below t0
        return (-integral + below) / pi

    return R


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Golub-Welsch: nodes are the eigenvalues of the Jacobi matrix of the Legendre recurrence.
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k**2 - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    return nodes, 2 * vecs[0] ** 2


# ---------------------------------------------------------------------------------------------------------
# f-divergence RLHF, Sec. 5.1
# ---------------------------------------------------------------------------------------------------------


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
    (``tests/test_optimal.py``). Kept so that the statement can be checked, not for use.
    """
    gen = f_divergence(f) if isinstance(f, str) else f
    w = gen.f_prime_inv(r.double() / beta)
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


# ---------------------------------------------------------------------------------------------------------
# Regularisers in the form of eq. (3.12), for `solve`
# ---------------------------------------------------------------------------------------------------------


def kl_regularizer(beta: float) -> Regularizer:
    """``R_{x,y}(pi) = -beta log(pi / ref(y|x))``: the KL penalty of (2.3) in the form of Sec. 3.3."""
    return lambda pi, ref: -beta * (torch.log(pi) - torch.log(ref))


def pm_regularizer(c1: float = 0.0, c2: float = 0.0) -> Regularizer:
    """``R(pi) = -log pi + C1 + C2 / pi``: every PM regulariser, Thm. 1 / eq. (3.8)."""
    return lambda pi, ref: -torch.log(pi) + c1 + c2 / pi


def conditional_pm_regularizer(alpha: float) -> Regularizer:
    """Eq. (4.1) with ``eps = ref`` and ``M(x) = {ref >= alpha}``: ``-log pi`` on M, ``-log(pi / ref)`` off it."""
    return lambda pi, ref: torch.where(ref >= alpha, -torch.log(pi), -(torch.log(pi) - torch.log(ref)))


def max_entropy_regularizer(tau: float) -> Regularizer:
    """``R(pi) = -tau log pi``: reward plus tau times the Shannon entropy."""
    return lambda pi, ref: -tau * torch.log(pi)


# ---------------------------------------------------------------------------------------------------------
# The numeric maximiser
# ---------------------------------------------------------------------------------------------------------

_PI_FLOOR = 1e-14


def solve(
    r: torch.Tensor,
    ref: torch.Tensor,
    regularizer: Regularizer,
    *,
    outer_iters: int = 64,
    inner_iters: int = 64,
) -> torch.Tensor:
    """Numerically maximise ``sum_i pi_i (r_i + R_i(pi_i))`` over the simplex, eq. (3.5) / (3.12).

    Assumes what the paper's derivation assumes: the objective is separable in the ``pi_i`` and each term
    ``phi_i(pi) = pi (r_i + R_i(pi))`` is concave. The KKT conditions are then necessary and sufficient:
    ``phi_i'(pi_i) = mu`` where ``pi_i > 0`` and ``phi_i'(0+) <= mu`` where ``pi_i = 0``. ``phi_i'`` comes from
    autograd (no closed form is used), each ``pi_i(mu)`` from bisection on ``phi_i'`` (decreasing), and
    ``mu`` from bisection on ``sum_i pi_i(mu) = 1``; all in float64. Probabilities below 1e-14 are taken as
    zero, so regularisers singular at 0 (log, 1/pi) need no special care. Accurate to ~1e-10.

    ``r`` and ``ref``: ``[..., k]``. Returns ``[..., k]`` in ``r``'s dtype.
    """
    r64 = r.detach().double()
    ref64 = torch.broadcast_to(ref.detach().double(), r64.shape)

    def dphi(pi: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            p = pi.clone().requires_grad_(True)
            phi = p * (r64 + regularizer(p, ref64))
            (grad,) = torch.autograd.grad(phi.sum(), p)
        return grad

    floor = torch.full_like(r64, _PI_FLOOR)
    ceil = torch.ones_like(r64)
    d_floor, d_ceil = dphi(floor), dphi(ceil)

    def pi_of_mu(mu: torch.Tensor) -> torch.Tensor:
        lo, hi = floor.clone(), ceil.clone()
        for _ in range(inner_iters):
            mid = (lo + hi) / 2
            above = dphi(mid) > mu
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        pi = (lo + hi) / 2
        pi = torch.where(d_floor <= mu, torch.zeros_like(pi), pi)
        return torch.where(d_ceil >= mu, ceil, pi)

    # sum_i pi_i(mu) is non-increasing in mu. At mu = min_i phi_i'(1/k) every pi_i >= 1/k, at the max every
    # pi_i <= 1/k: the root lies between, a bracket far tighter than [phi'(1), phi'(0+)].
    d_uniform = dphi(torch.full_like(r64, 1 / r64.shape[-1]))
    mu_lo = d_uniform.min(dim=-1, keepdim=True).values
    mu_hi = d_uniform.max(dim=-1, keepdim=True).values
    for _ in range(outer_iters):
        mu = (mu_lo + mu_hi) / 2
        total = pi_of_mu(mu).sum(-1, keepdim=True)
        # When one response takes all the mass the sum is exactly 1 on a whole interval of mu: stop there
        # instead of drifting to the interval's edge, where a second response starts to take mass.
        mu_lo = torch.where(total >= 1, mu, mu_lo)
        mu_hi = torch.where(total <= 1, mu, mu_hi)
    pi = pi_of_mu((mu_lo + mu_hi) / 2)
    return (pi / pi.sum(-1, keepdim=True)).to(r.dtype)


def objective(r: torch.Tensor, ref: torch.Tensor, regularizer: Regularizer, pi: torch.Tensor) -> torch.Tensor:
    """``sum_i pi_i (r_i + R_i(pi_i))``, shape ``[...]``.

    A zero probability contributes the limit of ``pi R(pi)`` as ``pi -> 0+``, which is not 0 for every
    regulariser: ``C2 / pi`` contributes ``C2`` (Remark 3.4) and an f-divergence ``-beta ref f(0)``.
    """
    pi = pi.double().clamp(min=_OBJ_FLOOR)
    return (pi * (r.double() + regularizer(pi, ref.double()))).sum(-1)


# Small enough that pi * R(pi) is at its limit for log and 1/pi singularities, large enough not to overflow.
_OBJ_FLOOR = 1e-200
