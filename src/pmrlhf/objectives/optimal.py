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

from collections.abc import Callable

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


def pm_with_reference(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Optimum of ``E_pi[r] - E_pi[log pi(y|x) - c(y)]``: ``e^{r + c} / sum e^{r + c}`` (Gibbs' variational
    principle). Every conditional PM rule is one choice of ``c``, the part of ``log pi_ref(y|x)`` its condition
    keeps (``penalties.optimum_terms``): all of it is KL RLHF (5.1), none PM (3.2), ``1[pi_ref(y|x) < alpha]
    log pi_ref(y|x)`` Def. 4.1; the per-token, length-normalised and prefix rules select tokens or responses
    by their own conditions."""
    return torch.softmax(r + c, dim=-1)


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
