import math

import torch

from pmrlhf.objectives import preference as P


def test_btl_is_eq_2_1_with_beta_scaling():
    r1, r2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(P.btl(r1, r2), torch.tensor([math.e / (math.e + 1), 1 / (1 + math.e**2)]))
    torch.testing.assert_close(P.btl(r1, r2, beta=0.5), P.btl(2 * r1, 2 * r2))


def test_pairwise_is_stable_for_long_responses():
    # Two 400-token responses at about -2.5 nats a token: exp() underflows to 0 in float32 and float64.
    logp1, logp2 = torch.tensor([-1000.0]), torch.tensor([-1001.0])
    assert torch.exp(logp1) == 0
    torch.testing.assert_close(P.pairwise(logp1, logp2), torch.tensor([1 / (1 + math.exp(-1))]))
    torch.testing.assert_close(P.pairwise(logp2, logp1) + P.pairwise(logp1, logp2), torch.tensor([1.0]))


def test_instance_pm_divergence_known_answer():
    # p_llm = 0.9 (logp difference log 9), p_reward = 0.5 (equal rewards):
    # KL = 0.9 log(0.9 / 0.5) + 0.1 log(0.1 / 0.5)
    d = P.instance_pm_divergence(
        torch.tensor([math.log(9)]), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0])
    )
    torch.testing.assert_close(d, torch.tensor([0.9 * math.log(1.8) + 0.1 * math.log(0.2)]))


def test_pm_divergence_is_zero_iff_preferences_match_and_is_finite_at_extremes():
    lp1, lp2 = torch.tensor([-3.0, -7.0]), torch.tensor([-4.0, -2.0])
    beta = 0.5
    r1, r2 = beta * lp1, beta * lp2  # p_reward(y1) = sigmoid((r1 - r2) / beta) = p_llm(y1)
    torch.testing.assert_close(P.instance_pm_divergence(lp1, lp2, r1, r2, beta), torch.zeros(2), atol=1e-7, rtol=0)
    # Collapsed policy (p_llm = 1 - 1e-400) against a 70/30 reward model: KL ~ log(1 / 0.7).
    d = P.instance_pm_divergence(
        torch.tensor([0.0]), torch.tensor([-1000.0]), torch.tensor([math.log(0.7 / 0.3)]), torch.tensor([0.0])
    )
    torch.testing.assert_close(d, torch.tensor([math.log(1 / 0.7)]))


def test_pm_divergence_is_the_mean_and_matches_the_naive_formula():
    g = torch.Generator().manual_seed(0)
    lp1, lp2, r1, r2 = (torch.randn(64, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    p, q = torch.sigmoid(lp1 - lp2), torch.sigmoid(r1 - r2)
    naive = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(P.instance_pm_divergence(lp1, lp2, r1, r2), naive)
    torch.testing.assert_close(P.pm_divergence(lp1, lp2, r1, r2), naive.mean())


def test_btl_fit_recovers_a_btl_reward_whatever_the_pair_weights():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 5, generator=g, dtype=torch.float64)
    r = r - r.mean(-1, keepdim=True)
    w = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)
    w = (w + w.transpose(-1, -2)) * (1 - torch.eye(5, dtype=torch.float64))
    fitted = P.btl_fit(torch.sigmoid(r[..., :, None] - r[..., None, :]), w)
    torch.testing.assert_close(fitted, r, atol=1e-8, rtol=0)


def test_btl_fit_of_non_btl_labels_is_the_stationary_point_of_the_likelihood():
    """Three answers in a cycle of preferences (no reward is BTL in them): the fit's gradient of the expected
    log-likelihood vanishes, computed by hand: ``sum_j w_ij (P_ij - sigmoid(r_i - r_j)) = 0`` for every i."""
    pref = torch.tensor([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]], dtype=torch.float64)
    w = torch.tensor([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=torch.float64)
    r = P.btl_fit(pref, w)
    gradient = (w * (pref - torch.sigmoid(r[:, None] - r[None, :]))).sum(-1)
    torch.testing.assert_close(gradient, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(r.sum().item()) < 1e-12
