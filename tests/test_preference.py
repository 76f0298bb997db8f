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


def _sample_counts(d: dict, shape) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(*shape, shape[-1], dtype=torch.float64)
    counts.index_put_((d["prompt"], d["winner"], d["loser"]), torch.ones(len(d["prompt"])).double(), accumulate=True)
    seen = counts + counts.transpose(-1, -2)
    return torch.where(seen > 0, counts / seen.clamp(min=1e-300), 0.5), seen


def _mixture(shares: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (shares[:, None, None] * torch.softmax(rewards.masked_fill(~mask, float("-inf")), -1)).sum(0)


def test_a_mixture_of_one_group_is_the_btl_fit_of_the_labels():
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.evaluation.truth import labelled_comparisons

    world = World.generate(WorldConfig(kind="text", n_prompts=4))
    d = labelled_comparisons(world, 2000, [5, 1], torch.Generator().manual_seed(0))
    shares, rewards, posterior = P.mixture_btl_em(d["prompt"], d["winner"], d["loser"], d["labeler"], d["mask"], 1)
    assert shares.tolist() == [1.0] and bool((posterior == 1).all())
    torch.testing.assert_close(rewards[0], P.btl_fit(*_sample_counts(d, d["mask"].shape), d["mask"]))


def test_em_over_named_labelers_finds_the_minority_and_its_share_where_one_btl_model_cannot():
    """The text world's groups (10 : 1, another favourite), 30000 comparisons by 20 + 2 labelers: EM puts every
    labeler in its group, gives the minority 1/11 of the comparisons, and its mixture gives the minority's answers
    their true mass (0.181) where one BTL model, even with unlimited labels, gives 0.165. Unnamed (a latent group
    per comparison), the labels fix only the pairwise preference: EM splits them evenly and finds no minority."""
    from pmrlhf.data.world import World, WorldConfig
    from pmrlhf.evaluation.study import minority_share
    from pmrlhf.evaluation.truth import labelled_comparisons, truth_over_m

    world = World.generate(WorldConfig(kind="text", n_prompts=12, seed=1))
    truth = truth_over_m(world)
    g = torch.Generator().manual_seed(1)
    d = labelled_comparisons(world, 30000, [20, 2], g)
    shares, rewards, posterior = P.mixture_btl_em(
        d["prompt"], d["winner"], d["loser"], d["labeler"], d["mask"], 2, generator=g
    )
    minority = int(shares.argmin())
    assert posterior.argmax(-1).tolist() == [1 - minority] * 20 + [minority] * 2
    assert abs(shares[minority].item() - 1 / 11) < 0.002
    true_share = minority_share(truth["truth"].tolist(), world)
    assert abs(true_share - 0.1814) < 1e-4
    assert abs(minority_share(_mixture(shares, rewards, d["mask"]).tolist(), world) - true_share) < 0.005
    assert minority_share(truth["learnable"].tolist(), world) < true_share - 0.015
    single = P.btl_fit(*_sample_counts(d, d["mask"].shape), d["mask"])
    assert minority_share(torch.softmax(single.masked_fill(~d["mask"], float("-inf")), -1).tolist(), world) < 0.17

    unnamed, _, _ = P.mixture_btl_em(
        d["prompt"], d["winner"], d["loser"], torch.arange(30000), d["mask"], 2, generator=g
    )
    assert unnamed.min() > 0.4


def test_the_mixture_table_of_the_study_is_computed_per_world_and_size():
    from pmrlhf.evaluation.truth import mixture_recovery

    table = mixture_recovery(seeds=[1], sizes=(3000,)).splitlines()
    assert table[0] == "| minority's answers, minus the truth | 3,000 comparisons |"
    named = table[2].split(" | ")[1].removesuffix(" |")
    assert table[2].startswith("| mixture by EM, labelers named |") and named.endswith("(1 seed)")
    assert abs(float(named.split()[0])) < 0.02 and table[-1].startswith("3,000: all labelers placed")
