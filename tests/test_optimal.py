"""Closed-form optima against the numeric maximiser, and the paper's statements as numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmrlhf.objectives import fdivergence as F
from pmrlhf.objectives import optimal as O

TOL = 1e-5


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@st.composite
def instances(draw, batch=8):
    """A batch of random (rewards, reference) instances with k in [2, 6] responses."""
    k = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0.1, 4.0))
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(batch, k, generator=g) * spread
    ref = torch.softmax(torch.randn(batch, k, generator=g) * draw(st.floats(0.0, 3.0)), -1)
    return r, ref


fast = settings(max_examples=15, deadline=None)


def assert_optimum(r, ref, R, closed):
    numeric = O.solve(r, ref, R)
    torch.testing.assert_close(closed, numeric, atol=TOL, rtol=0)
    # The closed form is at least as good as anything the solver found, and vice versa.
    gap = O.objective(r, ref, R, closed) - O.objective(r, ref, R, numeric)
    assert gap.abs().max() < 1e-8


@fast
@given(instances(), st.floats(0.05, 3.0))
def test_kl_rlhf_is_the_optimum_of_kl_regularised_rlhf(inst, beta):
    r, ref = inst
    assert_optimum(r, ref, O.kl_regularizer(beta), O.kl_rlhf(r, ref, beta))


@fast
@given(instances(), st.floats(-3, 3), st.floats(-3, 3))
def test_every_thm1_regulariser_gives_the_pm_policy(inst, c1, c2):
    r, ref = inst
    assert_optimum(r, ref, O.pm_regularizer(c1, c2), O.preference_matching(r))


@fast
@given(instances(), st.floats(-3, 3))
def test_thm2_response_dependent_c2_leaves_the_optimum_unchanged(inst, c1):
    r, ref = inst
    c2 = torch.rand(r.shape, generator=torch.Generator().manual_seed(1)) * 3  # C_{2,x,y}, one per response
    R = lambda pi, ref_: -torch.log(pi) + c1 + c2 / pi  # noqa: E731
    assert_optimum(r, ref, R, O.preference_matching(r))


@fast
@given(instances(), st.floats(0.05, 0.95))
def test_conditional_pm_closed_form_is_the_optimum_of_eq_4_1(inst, alpha):
    r, ref = inst
    assert_optimum(r, ref, O.conditional_pm_regularizer(alpha), O.conditional_pm(r, ref, alpha))


@fast
@given(instances(), st.floats(0.05, 0.95))
def test_conditional_pm_matches_the_reward_model_on_m_for_any_alpha(inst, alpha):
    """Thm. 4: conditional on M(x) = {ref >= alpha}, the optimum is the PL distribution over M(x)."""
    r, ref = inst
    pi = O.conditional_pm(r, ref, alpha)
    for b in range(r.shape[0]):
        m = ref[b] >= alpha
        if m.sum() == 0:
            continue
        conditional = pi[b][m] / pi[b][m].sum()
        torch.testing.assert_close(conditional, torch.softmax(r[b][m], -1), atol=1e-12, rtol=0)


@fast
@given(instances(), st.floats(0.1, 3.0))
def test_max_entropy_closed_form(inst, tau):
    r, ref = inst
    assert_optimum(r, ref, O.max_entropy_regularizer(tau), O.max_entropy(r, tau))


@fast
@given(instances(), st.floats(0.2, 3.0), st.sampled_from(sorted(F.F_DIVERGENCES)))
def test_f_divergence_rlhf_closed_form_is_the_optimum(inst, beta, name):
    r, ref = inst
    assert_optimum(r, ref, F.f_divergence_regularizer(beta, name), F.f_divergence_rlhf(r, ref, beta, name))


def test_f_divergence_optimum_hits_zero_where_f_prime_is_finite_at_zero():
    """chi^2 has f'(0) = -2: a low-reward response gets exactly zero probability, and the solver agrees."""
    r = torch.tensor([[3.0, 0.0, -4.0]])
    ref = torch.tensor([[0.2, 0.3, 0.5]])
    pi = F.f_divergence_rlhf(r, ref, 1.0, "chi2")
    assert pi[0, 2] == 0
    # KKT by hand: pi_i = ref_i (1 + (r_i - mu) / 2) on the support {0, 1}: 0.2 (1 + (3 - mu)/2)
    # + 0.3 (1 + (0 - mu)/2) = 0.8 - 0.25 mu = 1  =>  mu = -0.8; the third has (r - mu) = -3.2 < f'(0) = -2.
    torch.testing.assert_close(pi[0], torch.tensor([0.58, 0.42, 0.0]))
    torch.testing.assert_close(O.solve(r, ref, F.f_divergence_regularizer(1.0, "chi2")), pi, atol=1e-9, rtol=0)


def test_any_alpha_divergence_by_name():
    r, ref = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.25, 0.25]])
    for a in (-1.0, 0.3, 3.0):
        gen = F.f_divergence("alpha", alpha=a)
        assert_optimum(r, ref, F.f_divergence_regularizer(0.5, gen), F.f_divergence_rlhf(r, ref, 0.5, gen))
    with pytest.raises(ValueError, match="alpha not in"):
        F.f_divergence("alpha", alpha=1.0)
    with pytest.raises(ValueError, match="unknown f-divergence"):
        F.f_divergence("hellinger2")


def test_solver_against_a_grid_search():
    """The solver itself, checked by brute force on the 2-simplex for a non-closed-form regulariser."""
    r, ref = torch.tensor([[0.3, -0.2, 0.9]]), torch.tensor([[0.6, 0.3, 0.1]])
    R = lambda pi, ref_: -0.7 * torch.sqrt(pi / ref_) + 0.2 * pi  # noqa: E731  concave pi * R
    n = 600
    a, b = torch.meshgrid(torch.linspace(0, 1, n + 1), torch.linspace(0, 1, n + 1), indexing="ij")
    keep = a + b <= 1
    grid = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], -1)
    best = grid[O.objective(r, ref, R, grid).argmax()]
    torch.testing.assert_close(O.solve(r, ref, R)[0], best, atol=2 / n, rtol=0)


# --- the paper's statements --------------------------------------------------------------------------------


def binary(pi):
    return pi[..., 0] / (pi[..., 0] + pi[..., 1])


def test_prop_3_7_kl_rlhf_is_pm_exactly_at_beta_1_with_uniform_reference():
    r = torch.randn(50, 5, generator=torch.Generator().manual_seed(3))
    uniform = torch.full_like(r, 1 / 5)
    torch.testing.assert_close(O.kl_rlhf(r, uniform, 1.0), O.preference_matching(r), atol=1e-14, rtol=0)
    # Any other beta, or any non-uniform reference, moves it away.
    assert (O.kl_rlhf(r, uniform, 0.5) - O.preference_matching(r)).abs().max() > 0.05
    ref = torch.softmax(torch.randn(50, 5, generator=torch.Generator().manual_seed(4)), -1)
    assert (O.kl_rlhf(r, ref, 1.0) - O.preference_matching(r)).abs().max() > 0.05


def test_app_a3_beta_0_1_and_p_reward_0_7_collapses_above_0_99():
    """App. A.3 / Fig. 9: uniform reference, beta = 0.1, p_reward = 0.7 on r / beta  ->  p_rlhf > 0.99.

    Fig. 9 plots the aligned model against the preference of the reward r itself; its x-axis is
    sigmoid(r1 - r2), and the aligned model is sigmoid((r1 - r2) / beta)."""
    dr = math.log(0.7 / 0.3)  # sigmoid(dr) = 0.7
    r = torch.tensor([[dr, 0.0]])
    p = binary(O.kl_rlhf(r, torch.full_like(r, 0.5), 0.1)).item()
    assert p > 0.99
    torch.testing.assert_close(torch.tensor(p), torch.sigmoid(torch.tensor(dr / 0.1)))


def test_sec_5_2_reference_preference_of_0_or_1_collapses_the_aligned_model():
    r = torch.tensor([[-2.0, 2.0], [5.0, -5.0]])  # reward strongly prefers the other response
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pi = O.kl_rlhf(r, ref, 1.0)
    torch.testing.assert_close(binary(pi), torch.tensor([1.0, 0.0]))


def test_eq_5_2_binary_kl_rlhf_preference_is_the_product_of_reference_and_reward():
    r = torch.randn(30, 2, generator=torch.Generator().manual_seed(5))
    ref = torch.softmax(torch.randn(30, 2, generator=torch.Generator().manual_seed(6)), -1)
    beta = 0.7
    p_ref, p_rew = ref[:, 0], torch.sigmoid((r[:, 0] - r[:, 1]) / beta)
    expected = p_ref * p_rew / (p_ref * p_rew + (1 - p_ref) * (1 - p_rew))
    torch.testing.assert_close(binary(O.kl_rlhf(r, ref, beta)), expected)


@pytest.mark.parametrize("name", sorted(F.F_DIVERGENCES))
def test_sec_5_1_f_divergence_rlhf_is_biased_at_beta_1_unless_reverse_kl(name):
    r = torch.randn(40, 4, generator=torch.Generator().manual_seed(7)) * 2
    uniform = torch.full_like(r, 0.25)
    gap = (F.f_divergence_rlhf(r, uniform, 1.0, name) - O.preference_matching(r)).abs().max().item()
    if name == "reverse_kl":
        assert gap < 1e-10
    else:
        assert gap > 0.02


def test_prop_3_1_unregularised_optimum_is_the_argmax():
    r = torch.tensor([[0.51, 0.49, 0.1]])
    pi = O.solve(r, torch.full_like(r, 1 / 3), lambda pi, ref: 1e-6 * -torch.log(pi))
    assert pi[0, 0] > 0.999999


# --- Thm. 3 (generalised PL), checked rather than assumed --------------------------------------------------

G_FAMILIES = {
    # name: (g, g^{-1}, G = antiderivative of g)
    "exp": (torch.exp, torch.log, torch.exp),
    "exp(r/2)": (lambda r: torch.exp(r / 2), lambda p: 2 * torch.log(p), lambda r: 2 * torch.exp(r / 2)),
    "r": (lambda r: r, lambda p: p, lambda r: r**2 / 2),
    "r^2": (lambda r: r**2, torch.sqrt, lambda r: r**3 / 3),
}


@pytest.mark.parametrize("name", sorted(G_FAMILIES))
def test_thm3_as_stated_holds_only_for_exponential_g(name):
    g, g_inv, G = G_FAMILIES[name]
    r = torch.rand(20, 4, generator=torch.Generator().manual_seed(8)) * 2 + 0.5  # positive rewards
    ref = torch.full_like(r, 0.25)
    target = O.generalized_pl(r, g)
    gap = (O.solve(r, ref, O.thm3_regularizer(g_inv, G)) - target).abs().max().item()
    if name.startswith("exp"):
        assert gap < TOL
    else:
        # Eq. (3.14) is not preference-matching for these g: its optimum misses the generalised PL
        # distribution by far more than the solver's error.
        assert gap > 0.05


@pytest.mark.parametrize("name", sorted(G_FAMILIES))
def test_generalized_pm_regularizer_matches_for_every_g(name):
    g, g_inv, _ = G_FAMILIES[name]
    r = torch.rand(20, 4, generator=torch.Generator().manual_seed(9)) * 2 + 0.5
    scale = g(r).sum(-1, keepdim=True)
    assert_optimum(r, torch.full_like(r, 0.25), O.generalized_pm_regularizer(g_inv, scale), O.generalized_pl(r, g))


def test_thm3_counterexample_by_hand():
    """g(r) = r: eq. (3.14) gives R(pi) = -pi + (pi^2/2)/pi = -pi/2, so the objective is
    sum pi_i (r_i - pi_i / 2), maximised at pi_i = r_i - mu, not at r_i / sum(r)."""
    r = torch.tensor([[1.0, 2.0]])
    pi = O.solve(r, torch.full_like(r, 0.5), O.thm3_regularizer(lambda p: p, lambda u: u**2 / 2))
    torch.testing.assert_close(pi, torch.tensor([[0.0, 1.0]]), atol=1e-9, rtol=0)  # pi_2 - pi_1 = 1
    torch.testing.assert_close(O.generalized_pl(r, lambda u: u), torch.tensor([[1 / 3, 2 / 3]]))


def test_generalized_pl_rejects_non_positive_g():
    with pytest.raises(ValueError, match="g\\(r\\) > 0"):
        O.generalized_pl(torch.tensor([[-1.0, 1.0]]), lambda u: u)


def test_eq_5_3_is_not_the_f_divergence_optimum_the_paper_says_it_is():
    """chi^2, r = (1, 0), uniform reference, beta = 1: the optimum pi_i = 0.5 (1 + (r_i - mu) / 2) sums to 1 at
    mu = 0.5, so it prefers y1 with 0.625; eq. (5.3) gives 1.5 / (1.5 + 1) = 0.600. For reverse KL they agree."""
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    exact = F.f_divergence_rlhf(r, ref, 1.0, "chi2")
    torch.testing.assert_close(exact[0, 0], torch.tensor(0.625, dtype=torch.float64))
    torch.testing.assert_close(F.eq_5_3_binary(r, ref, 1.0, "chi2")[0], torch.tensor(0.6, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    # rewards where every generator's (f')^{-1}(r) is defined and positive, as eq. (5.3) needs
    r = -0.1 - 0.8 * torch.rand(30, 2, generator=g, dtype=torch.float64)
    ref = torch.softmax(torch.randn(30, 2, generator=g, dtype=torch.float64), -1)
    for name in sorted(F.F_DIVERGENCES):
        pi = F.f_divergence_rlhf(r, ref, 1.0, name)
        preference = F.eq_5_3_binary(r, ref, 1.0, name)
        assert ((preference > 0) & (preference < 1)).all()
        gap = (pi[:, 0] / pi.sum(-1) - preference).abs().max().item()
        assert gap < 1e-9 if name == "reverse_kl" else gap > 1e-3, name


def test_generalized_pm_regularizer_for_g_bounded_away_from_zero():
    """g = 1 + e^r on rewards of both signs: g^{-1}(u) = log(u - 1) exists above g_inf = 1 only. With g_inf the
    regulariser matches the generalised PL model; without it, it refuses instead of returning NaN."""
    g, g_inv = (lambda u: 1 + torch.exp(u)), (lambda p: torch.log(p - 1))
    r = torch.randn(20, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 1.5
    scale = g(r).sum(-1, keepdim=True)
    uniform = torch.full_like(r, 0.25)
    assert_optimum(r, uniform, O.generalized_pm_regularizer(g_inv, scale, g_inf=1.0), O.generalized_pl(r, g))
    with pytest.raises(ValueError, match="g_inf"):
        O.solve(r, uniform, O.generalized_pm_regularizer(g_inv, scale))


def test_eq_5_3_refuses_rewards_outside_the_domain_of_the_inverse_derivative():
    """chi^2's (f')^{-1}(u) = 1 + u / 2 is a ratio only above u = -2: at r = (-3, 0) the formula gave -1."""
    r = torch.tensor([[-3.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"needs r / beta in \(-2, inf\)"):
        F.eq_5_3_binary(r, ref, 1.0, "chi2")
