import math

import pytest
import torch

from pmrlhf.objectives import dpo, optimal
from pmrlhf.objectives.dpo import Pairs


def test_dpo_sigmoid_and_cdpo_known_values():
    c, r, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # delta = (-1 + 2) - (-3 + 2) = 2; beta = 0.5 -> -log sigmoid(1)
    torch.testing.assert_close(dpo.dpo_sigmoid(Pairs(c, r, rc, rr), beta=0.5), torch.tensor([math.log1p(math.exp(-1))]))
    eps = 0.1
    expected = (1 - eps) * math.log1p(math.exp(-1)) + eps * math.log1p(math.exp(1))
    torch.testing.assert_close(
        dpo.dpo_sigmoid(Pairs(c, r, rc, rr), beta=0.5, label_smoothing=eps), torch.tensor([expected])
    )
    # cDPO = (1 - eps) L(w, l) + eps L(l, w): the textbook's identity
    swapped = dpo.dpo_sigmoid(Pairs(r, c, rr, rc), beta=0.5)
    torch.testing.assert_close(
        dpo.dpo_sigmoid(Pairs(c, r, rc, rr), beta=0.5, label_smoothing=eps),
        (1 - eps) * dpo.dpo_sigmoid(Pairs(c, r, rc, rr), beta=0.5) + eps * swapped,
    )


def test_robust_ipo_simpo_known_values():
    c, r, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    eps = 0.2
    robust = ((1 - eps) * math.log1p(math.exp(-1)) - eps * math.log1p(math.exp(1))) / (1 - 2 * eps)
    torch.testing.assert_close(
        dpo.dpo_robust(Pairs(c, r, rc, rr), beta=0.5, label_smoothing=eps), torch.tensor([robust])
    )
    lc, lr = torch.tensor([2.0]), torch.tensor([4.0])
    # per-token log-ratios: 1 / 2 - (-1) / 4 = 0.75; (0.75 - 1 / (2 * 0.5))^2 = 0.0625
    torch.testing.assert_close(dpo.ipo(Pairs(c, r, rc, rr, lc, lr), beta=0.5), torch.tensor([0.0625]))
    # SimPO: beta (-1/2 - (-3/4)) - gamma = 2 * 0.25 - 1 = -0.5
    torch.testing.assert_close(
        dpo.simpo(Pairs(c, r, None, None, lc, lr), beta=2.0, simpo_gamma=1.0), torch.tensor([math.log1p(math.exp(0.5))])
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.dpo_robust(Pairs(c, r, rc, rr), label_smoothing=0.5)


def test_pm_dpo_is_dpo_with_a_uniform_reference_and_cpm_interpolates():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(8, generator=g) - 3, torch.randn(8, generator=g) - 3
    uniform = torch.full((8,), math.log(0.25))
    torch.testing.assert_close(
        dpo.pm_dpo(Pairs(c, r), beta=0.7), dpo.dpo_sigmoid(Pairs(c, r, uniform, uniform), beta=0.7)
    )
    rc, rr = torch.randn(8, generator=g) - 3, torch.randn(8, generator=g) - 3
    # alpha below every reference probability: PM-DPO; above every one: DPO.
    torch.testing.assert_close(
        dpo.cpm_dpo(Pairs(c, r, rc, rr), beta=0.7, alpha=1e-30), dpo.pm_dpo(Pairs(c, r), beta=0.7)
    )
    torch.testing.assert_close(
        dpo.cpm_dpo(Pairs(c, r, rc, rr), beta=0.7, alpha=1.0), dpo.dpo_sigmoid(Pairs(c, r, rc, rr), beta=0.7)
    )


@pytest.mark.parametrize(
    "loss,beta,alpha", [("sigmoid", 0.5, 0.0), ("pm", 1.0, 0.0), ("pm", 0.5, 0.0), ("cpm", 1.0, 0.1)]
)
def test_minimising_on_btl_comparisons_reaches_the_closed_form(loss, beta, alpha):
    """A tabular policy over k responses for P prompts, fitted to BTL-sampled comparisons of every pair."""
    g = torch.Generator().manual_seed(1)
    P, k, N = 3, 4, 60_000
    r_star = torch.randn(P, k, generator=g, dtype=torch.float64)
    ref = torch.softmax(2 * torch.randn(P, k, generator=g, dtype=torch.float64), -1)
    prompt = torch.randint(P, (N,), generator=g)
    a = torch.randint(k, (N,), generator=g)
    b = (a + torch.randint(1, k, (N,), generator=g)) % k  # a != b, every pair equally often
    a_wins = torch.rand(N, generator=g, dtype=torch.float64) < torch.sigmoid(r_star[prompt, a] - r_star[prompt, b])
    win, lose = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    logits = torch.zeros(P, k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")
    log_ref = ref.log()

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(logits, -1)
        w, l = logp[prompt, win], logp[prompt, lose]
        rw, rl = log_ref[prompt, win], log_ref[prompt, lose]
        value = {
            "sigmoid": lambda: dpo.dpo_sigmoid(Pairs(w, l, rw, rl), beta=beta),
            "pm": lambda: dpo.pm_dpo(Pairs(w, l), beta=beta),
            "cpm": lambda: dpo.cpm_dpo(Pairs(w, l, rw, rl), beta=beta, alpha=alpha),
        }[loss]().mean()
        value.backward()
        return value

    opt.step(closure)
    fitted = torch.softmax(logits.detach(), -1)
    target = dpo.implicit_target(loss, r_star, ref, beta, alpha)
    assert (fitted - target).abs().sum(-1).max() / 2 < 0.02
    # ...and not the other family's optimum: DPO keeps the reference's bias, PM-DPO does not.
    other = optimal.max_entropy(r_star, beta) if loss == "sigmoid" else optimal.kl_rlhf(r_star, ref, beta)
    assert (fitted - other).abs().sum(-1).max() / 2 > 0.1


def _instance(seed=2, P=6, k=5):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(P, k, generator=g, dtype=torch.float64)
    ref = torch.softmax(2 * torch.randn(P, k, generator=g, dtype=torch.float64), -1)
    lengths = torch.randint(1, 12, (P, k), generator=g).double()
    return r, ref, lengths


@pytest.mark.parametrize("loss,kwargs", [("sigmoid", {}), ("pm", {}), ("cpm", {"alpha": 0.15})])
def test_the_population_minimiser_finds_each_closed_form(loss, kwargs):
    """The numeric minimiser that gives cDPO, robust DPO, IPO and SimPO their targets, checked where a closed form
    exists; a prompt with fewer responses (the mask) is handled as the world's are."""
    r, ref, _ = _instance()
    mask = torch.ones_like(r, dtype=torch.bool)
    mask[0, -1] = False
    ref = torch.where(mask, ref, 0.0)
    ref = ref / ref.sum(-1, keepdim=True)
    preference = torch.sigmoid(r[..., :, None] - r[..., None, :])
    found = dpo.population_minimiser(loss, preference, ref, mask=mask, beta=0.6, **kwargs)
    closed = dpo.implicit_target(loss, r.masked_fill(~mask, float("-inf")), ref, 0.6, kwargs.get("alpha", 0.0))
    torch.testing.assert_close(found, closed, atol=1e-7, rtol=0)


def test_cdpo_fits_the_smoothed_labels_and_stays_nearer_the_reference_than_dpo():
    """On two responses cDPO's optimum has sigmoid(beta delta) = p + eps (1 - 2p): its preference between them is
    the smoothed label, not the reward's."""
    r = torch.tensor([[1.5, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    eps, beta = 0.1, 0.5
    pi = dpo.implicit_target("sigmoid", r, ref, beta, label_smoothing=eps)
    p = torch.sigmoid(torch.tensor(1.5, dtype=torch.float64))
    delta = torch.log(pi[0, 0] / ref[0, 0]) - torch.log(pi[0, 1] / ref[0, 1])
    torch.testing.assert_close(torch.sigmoid(beta * delta), p + eps * (1 - 2 * p), atol=1e-8, rtol=0)
    r, ref, _ = _instance()
    dpo_target = dpo.implicit_target("sigmoid", r, ref, 1.0)
    cdpo = dpo.implicit_target("sigmoid", r, ref, 1.0, label_smoothing=0.1)
    assert ((cdpo - dpo_target).abs().sum(-1) / 2).mean() > 0.05
    # smoothed labels are less sure, so the implicit rewards are smaller and the optimum stays nearer the reference
    kl_to_ref = lambda q: (q * (q / ref).log()).sum(-1)  # noqa: E731
    assert (kl_to_ref(cdpo) < kl_to_ref(dpo_target)).all()


def test_robust_dpo_on_clean_labels_is_unbounded_where_a_pair_is_surer_than_the_flip_rate():
    """Robust DPO fits (p - eps) / (1 - 2 eps): in [0, 1] only while eps <= p <= 1 - eps. Beyond, its expected loss
    has no minimum and the target is NaN; within, it is sharper than DPO's."""
    ref = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    r = torch.tensor([[0.5, 0.0], [4.0, 0.0]], dtype=torch.float64)  # p = 0.62 and 0.98
    pi = dpo.implicit_target("robust", r, ref, 1.0, label_smoothing=0.1)
    assert torch.isnan(pi[1]).all()
    p = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(pi[0, 0], (p - 0.1) / 0.8, atol=1e-7, rtol=0)


def test_ipo_target_fits_the_per_token_margins():
    """IPO's population optimum on two responses: per-token log-ratio margin (2p - 1) / (2 beta)."""
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    lengths = torch.tensor([[3.0, 5.0]], dtype=torch.float64)
    pi = dpo.implicit_target("ipo", r, ref, 0.5, lengths=lengths)
    h = torch.log(pi / ref)[0] / lengths[0]
    p = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(h[0] - h[1], (2 * p - 1) / (2 * 0.5), atol=1e-7, rtol=0)
    assert pi.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(dpo.DPO_LOSSES))
def test_each_loss_reads_the_reference_exactly_when_its_registry_entry_says_so(name):
    entry = dpo.DPO_LOSSES[name]
    g = torch.Generator().manual_seed(2)
    c, r, rc, rr, other_c, other_r = (torch.randn(6, generator=g) - 3 for _ in range(6))
    lc, lr = torch.randint(1, 6, (6,), generator=g).float(), torch.randint(1, 6, (6,), generator=g).float()
    values = {"beta": 0.5, "label_smoothing": 0.1, "simpo_gamma": 0.5, "alpha": 0.2}
    kw = {k: values[k] for k in entry.hyperparameters}
    if entry.needs_reference:
        with_ref = entry.fn(Pairs(c, r, rc, rr, lc, lr), **kw)
        assert not torch.allclose(with_ref, entry.fn(Pairs(c, r, other_c, other_r, lc, lr), **kw))
    else:
        assert torch.isfinite(entry.fn(Pairs(c, r, None, None, lc, lr), **kw)).all()


def _mixture(seed=3, P=4, k=4):
    """Labels from two groups (shares 0.8, 0.2) with their own rewards, and pairs shown unevenly."""
    g = torch.Generator().manual_seed(seed)
    rewards = 2 * torch.randn(2, P, k, generator=g, dtype=torch.float64)
    shares = torch.tensor([0.8, 0.2], dtype=torch.float64)[:, None, None, None]
    preference = (shares * torch.sigmoid(rewards[..., :, None] - rewards[..., None, :])).sum(0)
    dist = torch.softmax(torch.randn(P, k, generator=g, dtype=torch.float64), -1)
    weights = dist[..., :, None] * dist[..., None, :]
    return preference, weights * (1 - torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("loss,kwargs", [("sigmoid", {}), ("pm", {}), ("cpm", {"alpha": 0.15})])
def test_closed_forms_hold_at_the_btl_fit_when_labels_are_not_btl(loss, kwargs):
    """Labels from a mixture of groups, pairs shown unevenly: the numeric minimiser of each loss's expected value
    under those labels and weights lands on the closed form at the BTL fit of the labels, and that fit depends on
    the weights (pairs shown alike give another optimum)."""
    preference, weights = _mixture()
    _, ref, _ = _instance(P=4, k=4)
    reward = torch.zeros(4, 4, dtype=torch.float64)  # replaced by the fit
    found = dpo.population_minimiser(loss, preference, ref, pair_weights=weights, beta=0.6, **kwargs)
    closed = dpo.implicit_target(
        loss, reward, ref, 0.6, kwargs.get("alpha", 0.0), preference=preference, pair_weights=weights
    )
    torch.testing.assert_close(found, closed, atol=1e-7, rtol=0)
    evenly = dpo.implicit_target(loss, reward, ref, 0.6, kwargs.get("alpha", 0.0), preference=preference)
    assert ((evenly - closed).abs().sum(-1) / 2).max() > 1e-3


@pytest.mark.parametrize(
    "loss,hyper",
    [
        ("sigmoid", {"beta": 0.3, "label_smoothing": 0.0}),
        ("robust", {"beta": 0.3, "label_smoothing": 0.0}),
        ("ipo", {"beta": 0.3}),
        ("simpo", {"beta": 2.0, "simpo_gamma": 0.7}),
        ("pm", {"beta": 0.5}),
        ("cpm", {"beta": 0.5, "alpha": 0.05}),
    ],
)
def test_each_loss_is_its_model_of_its_own_implicit_reward(loss, hyper):
    """What the DPO stage logs as accuracy and margin is each loss's own: the Bradley-Terry losses are
    ``-log sigmoid(r_w - r_l - gamma)`` in their implicit reward (gamma: SimPO's target margin, 0 elsewhere),
    IPO is ``(r_w - r_l - 1 / (2 beta))^2`` in its per-token log-ratio."""
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(4, 8, generator=g, dtype=torch.float64) * 30
    lengths = torch.randint(1, 20, (2, 8), generator=g).double()
    x = dpo.Pairs(lp[0], lp[1], lp[2], lp[3], lengths[0], lengths[1])
    entry = dpo.DPO_LOSSES[loss]
    chosen, rejected = entry.implicit_reward(x, **hyper)
    margin = chosen - rejected
    if loss == "ipo":
        expected = (margin - 1 / (2 * hyper["beta"])) ** 2
    else:
        expected = -torch.nn.functional.logsigmoid(margin - hyper.get("simpo_gamma", 0.0))
    torch.testing.assert_close(entry.fn(x, **hyper), expected, atol=1e-12, rtol=0)
    # and the conditional rule's reward is PM-DPO's above alpha and DPO's below
    if loss == "cpm":
        above = lp[2] >= math.log(hyper["alpha"])
        torch.testing.assert_close(chosen, torch.where(above, 0.5 * lp[0], 0.5 * (lp[0] - lp[2])))
