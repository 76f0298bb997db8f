"""Every penalty optimises the objective it states: the expected PPO update, computed exactly by enumerating
every response of a small tabular MDP, equals the exact gradient of that objective to 1e-8 in float64.

The MDP: responses are ``L`` tokens from a vocabulary of ``V``; the policy is a table of logits per prefix, the
reference a fixed table of probabilities, the reward a fixed number per response. The update is the gradient
of the stage's own loss (``rl.ppo_policy_loss`` on advantages from ``rl.shape_rewards`` and ``rl.gae`` or the
sequence baselines, plus ``rl.kl_loss`` where the KL sits in the loss), each sample weighted by its exact
probability: no sampling anywhere.

The second MDP below has an end-of-sequence token, so responses have different lengths and minibatches of 1-3
responses hold different numbers of tokens: there the update is exact with the stage's default constant
normaliser, and not with the token mean.
"""

import itertools
import math

import pytest
import torch

from pmrlhf.objectives import penalties as PEN
from pmrlhf.objectives import rl

V, L = 3, 2
COEF = 0.7
# (penalty, kwargs): every registered penalty with each option that changes what it computes. The alphas put
# some responses (cpm_sequence, cpm_mean), tokens (cpm_token) or prefixes (cpm_prefix) on each side of the
# threshold in this MDP.
CASES = [
    ("kl", {}),
    ("pm", {}),
    ("maxent", {"tau": 0.4}),
    ("cpm_sequence", {"alpha": 0.08}),
    ("cpm_sequence", {"alpha": 0.2}),
    ("cpm_token", {"alpha": 0.3}),
    ("cpm_token", {"alpha": 0.45}),
    ("cpm_mean", {"alpha": 0.3}),
    ("cpm_mean", {"alpha": 0.45}),
    ("cpm_prefix", {"alpha": 0.1}),
    ("cpm_prefix", {"alpha": 0.3}),
    ("cpm_running", {"alpha": 0.12}),
    ("cpm_running", {"alpha": 0.3}),
]


def mdp(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)]
    ref = [
        torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1),
        torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5, -1),
    ]
    reward = torch.randn(V, V, generator=g, dtype=torch.float64)
    return [t.requires_grad_(True) for t in theta], ref, reward


def responses():
    return torch.tensor(list(itertools.product(range(V), repeat=L)))  # [V**L, L]


def token_logprobs(theta, ys):
    """``[N, L]`` log-probabilities of each token of each response under the tabular policy ``theta``."""
    first = torch.log_softmax(theta[0], -1)[ys[:, 0]]
    second = torch.log_softmax(theta[1], -1)[ys[:, 0], ys[:, 1]]
    return torch.stack([first, second], -1)


def ref_logprobs(ref, ys):
    return torch.stack([ref[0][ys[:, 0]].log(), ref[1][ys[:, 0], ys[:, 1]].log()], -1)


def exact_gradient(theta, ref, reward, regularizer):
    """``grad_theta sum_y pi(y) (r(y) - coef * regularizer(y))``, from the enumerated objective."""
    ys = responses()
    logp = token_logprobs(theta, ys)
    mask = torch.ones_like(logp)
    pi = logp.sum(-1).exp()
    objective = (pi * (reward[ys[:, 0], ys[:, 1]] - COEF * regularizer(logp, ref_logprobs(ref, ys), mask))).sum()
    return torch.autograd.grad(objective, theta)


def samples(group):
    """Every ordered tuple of ``group`` responses (one tuple per prompt's group) and its exact probability's
    index rows: ``[N * group, L]`` responses, with ``tuple_of[i]`` the tuple row i belongs to."""
    ys = responses()
    tuples = list(itertools.product(range(len(ys)), repeat=group))
    rows = torch.tensor([i for t in tuples for i in t])
    return ys[rows], torch.arange(len(tuples)).repeat_interleave(group)


def expected_update(theta, ref, reward, penalty, advantage="gae", group=1, kl_in_loss=None):
    """``-grad`` of the stage's policy loss in expectation over the samples, times ``L`` (the token mean's
    normaliser), so that it is comparable with ``exact_gradient``."""
    ys, tuple_of = samples(group)
    logp = token_logprobs(theta, ys)  # new log-probabilities, differentiated
    old = logp.detach()  # the sampler's
    ref_lp = ref_logprobs(ref, ys)
    mask = torch.ones_like(old)
    weight = old.sum(-1).exp().reshape(-1, group).prod(-1)[tuple_of]  # the tuple's probability, per row
    scores = reward[ys[:, 0], ys[:, 1]]
    rewards = rl.shape_rewards(scores, penalty(old, ref_lp, mask), mask, COEF, beta=1.0, clip=math.inf)
    if advantage == "gae":
        advantages, _ = rl.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    else:
        per_sequence = rl.SEQUENCE_ADVANTAGES[advantage](rewards.sum(-1), group)
        advantages = rl.sequence_advantages_to_tokens(per_sequence, mask)
    n_rows = len(ys)
    # masked_mean divides by n_rows * L; weighting row i by n_rows * weight_i / group turns the batch mean into
    # the expectation over tuples of the mean over a tuple's rows.
    scale = (weight * n_rows / group)[:, None]
    loss, _ = rl.ppo_policy_loss(logp, old, advantages * scale, mask)
    if kl_in_loss is not None:
        loss = loss + COEF * (rl.kl_loss(logp, ref_lp, mask, kl_in_loss) * scale[:, 0]).sum() / mask.sum()
    return [-L * g for g in torch.autograd.grad(loss, theta)]


def assert_equal(update, gradient, factor=1.0, atol=1e-8):
    for u, g in zip(update, gradient, strict=True):
        torch.testing.assert_close(u, factor * g, atol=atol, rtol=0)


def test_every_registered_penalty_is_covered_with_each_of_its_hyperparameters():
    assert {name for name, _ in CASES} == set(PEN.PENALTIES), "a penalty the enumeration below does not cover"
    for name, kwargs in CASES:
        assert set(kwargs) == set(PEN.PENALTIES[name].hyperparameters), name


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("advantage,group,factor", [("gae", 1, 1.0), ("rloo", 2, 1.0), ("group_mean", 3, 2 / 3)])
def test_expected_update_is_the_exact_gradient_of_the_stated_objective(name, kwargs, advantage, group, factor):
    """GAE at lambda = 1 with zero values (reward to go), RLOO, and the group mean, whose baseline includes the
    sample itself and so shrinks the update by (group - 1) / group."""
    theta, ref, reward = mdp()
    penalty = lambda lp, rl_, m: PEN.get_penalty(name).penalty(lp, rl_, m, **kwargs)  # noqa: E731
    regularizer = lambda lp, rl_, m: PEN.get_penalty(name).regularizer(lp, rl_, m, **kwargs)  # noqa: E731
    update = expected_update(theta, ref, reward, penalty, advantage, group)
    assert_equal(update, exact_gradient(theta, ref, reward, regularizer), factor)


def test_the_thresholds_split_this_mdp():
    """Each alpha above has responses (or tokens, or prefixes) on both sides, so both branches of each rule are
    exercised; for cpm_prefix some responses switch to the KL form at their second token only, and for cpm_running
    some switch on there, and at the lower alpha some switch back off."""
    _, ref, _ = mdp()
    ref_lp = ref_logprobs(ref, responses())
    by_rule = {
        "cpm_sequence": ref_lp.sum(-1).exp(),
        "cpm_mean": (ref_lp.mean(-1)).exp(),
        "cpm_token": ref_lp.exp(),
        "cpm_prefix": ref_lp.cumsum(-1).exp(),
        "cpm_running": (ref_lp.cumsum(-1) / torch.arange(1, L + 1)).exp(),
    }
    for name, kwargs in CASES:
        if "alpha" in kwargs:
            values = by_rule[name]
            assert (values >= kwargs["alpha"]).any() and (values < kwargs["alpha"]).any(), (name, kwargs)
            if name == "cpm_prefix" or (name, kwargs) == ("cpm_running", {"alpha": 0.3}):
                assert ((values[:, 0] >= kwargs["alpha"]) & (values[:, 1] < kwargs["alpha"])).any(), (name, kwargs)
            if (name, kwargs) == ("cpm_running", {"alpha": 0.12}):  # the running mean recovers: PM again
                assert ((values[:, 0] < kwargs["alpha"]) & (values[:, 1] >= kwargs["alpha"])).any()


@pytest.mark.parametrize("name,kwargs", CASES)
def test_optimum_terms_give_the_enumerated_optimum(name, kwargs):
    """``pm_with_reference(r / (coef s), c / s)`` maximises the stated objective: no response moves it up, checked
    against ``optimal.solve`` on the enumerated responses."""
    from pmrlhf.objectives import optimal as O

    _, ref, reward = mdp()
    ys = responses()
    ref_lp = ref_logprobs(ref, ys)
    s, c = PEN.optimum_terms(name, ref_lp, torch.ones_like(ref_lp), **kwargs)
    r = reward[ys[:, 0], ys[:, 1]] / COEF
    pi = O.pm_with_reference(r / s, c / s)
    solved = O.solve(r, torch.ones_like(r), lambda p, _: -(s * torch.log(p) - c))
    torch.testing.assert_close(pi, solved, atol=1e-9, rtol=0)

    # and it is the stated objective's optimum: E[r] - coef E[regulariser] at pi beats any perturbation of it
    def value(p):
        logp = p.log()[:, None] * torch.tensor([1.0, 0.0], dtype=torch.float64)  # the sequence log-prob on token 1
        reg = PEN.get_penalty(name).regularizer(logp, ref_lp, torch.ones_like(ref_lp), **kwargs)
        return (p * (r * COEF - COEF * reg)).sum()

    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = torch.softmax(pi.log() + 0.3 * torch.randn(len(pi), generator=g, dtype=torch.float64), -1)
        assert value(pi) > value(other)


def test_def_4_1_spread_over_the_tokens_is_biased_under_reward_to_go():
    """The rule cpm_sequence replaced: ``log pi - log pi_ref`` on every token of a response off M(x). Its sum is
    Def. 4.1's regulariser, but token 1's penalty depends on token 2, so reward-to-go credit misses the
    gradient of Def. 4.1 (RLOO, which credits whole responses, does not)."""
    theta, ref, reward = mdp()
    alpha = 0.08

    def spread(lp, ref_lp, m):
        off = (ref_lp * m).sum(-1, keepdim=True) < math.log(alpha)
        return torch.where(off, lp - ref_lp, lp) * m

    definition = PEN.get_penalty("cpm_sequence").regularizer
    gradient = exact_gradient(theta, ref, reward, lambda lp, r_, m: definition(lp, r_, m, alpha))
    gap = max(
        (u - g).abs().max().item() for u, g in zip(expected_update(theta, ref, reward, spread), gradient, strict=True)
    )
    assert gap > 1e-3  # five orders of magnitude above the tolerance the exact rules meet
    assert_equal(expected_update(theta, ref, reward, spread, "rloo", 2), gradient)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_k2_k3_as_rewards_are_not_kl_penalties(estimator):
    """Used as a reward, ``-coef * k3`` follows ``E r - coef KL(pi || ref) + coef KL(ref || pi)``; neither k2
    nor k3 gives the gradient of the KL objective (2.3)."""
    theta, ref, reward = mdp()

    def as_reward(lp, ref_lp, m):
        d = lp - ref_lp
        return (d.pow(2) / 2 if estimator == "k2" else torch.expm1(-d) + d) * m

    gradient = exact_gradient(theta, ref, reward, PEN.get_penalty("kl").regularizer)
    gap = max(
        (u - g).abs().max().item()
        for u, g in zip(expected_update(theta, ref, reward, as_reward), gradient, strict=True)
    )
    assert gap > 1e-2


def _forward_kl(theta, ref):
    """``KL(pi_ref || pi)`` over the enumerated responses, as a function of ``theta``."""
    ys = responses()
    ref_seq = ref_logprobs(ref, ys).sum(-1)
    return (ref_seq.exp() * (ref_seq - token_logprobs(theta, ys).sum(-1))).sum()


@pytest.mark.parametrize("advantage,group,factor", [("gae", 1, 1.0), ("rloo", 2, 1.0)])
def test_k2_in_the_loss_is_the_gradient_of_kl_rlhf(advantage, group, factor):
    """No penalty in the reward, k2 of the whole response in the loss: the exact gradient of eq. (2.3)."""
    theta, ref, reward = mdp()
    none = lambda lp, r_, m: torch.zeros_like(lp)  # noqa: E731
    update = expected_update(theta, ref, reward, none, advantage, group, kl_in_loss="k2")
    assert_equal(update, exact_gradient(theta, ref, reward, PEN.get_penalty("kl").regularizer), factor)


def test_k3_in_the_loss_is_the_gradient_of_forward_kl_rlhf():
    """k3 of the whole response in the loss: the exact gradient of ``E r - coef KL(pi_ref || pi)``."""
    theta, ref, reward = mdp()
    none = lambda lp, r_, m: torch.zeros_like(lp)  # noqa: E731
    update = expected_update(theta, ref, reward, none, kl_in_loss="k3")
    zero = lambda lp, r_, m: torch.zeros(lp.shape[0], dtype=lp.dtype)  # noqa: E731
    reward_part = exact_gradient(theta, ref, reward, zero)
    kl_part = torch.autograd.grad(_forward_kl(theta, ref), theta)
    assert_equal(update, [g - COEF * k for g, k in zip(reward_part, kl_part, strict=True)])


def test_per_token_k3_in_the_loss_is_not_the_forward_kl_gradient():
    """GRPO's per-token k3: the KL of the tokens after each one is lost, and the update misses the gradient."""
    theta, ref, reward = mdp()
    ys = responses()
    logp = token_logprobs(theta, ys)
    ref_lp = ref_logprobs(ref, ys)
    weight = logp.detach().sum(-1).exp()
    d = logp - ref_lp
    per_token = (weight[:, None] * (torch.expm1(-d) + d)).sum()
    update = torch.autograd.grad(per_token, theta)
    exact = torch.autograd.grad(_forward_kl(theta, ref), theta)
    assert max((u - g).abs().max().item() for u, g in zip(update, exact, strict=True)) > 1e-2


def test_kl_loss_refuses_k1():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="zero expected gradient"):
        rl.kl_loss(x, x, torch.ones(1, 2), "k1")


# --- responses of different lengths ------------------------------------------------------------------------------
# The MDP again with token 0 as the end of sequence: a response stops after it, or is cut at T_MAX tokens, so it
# has 1-3 tokens (right-padded). A minibatch is ``k`` responses drawn from the policy; the expected update is the
# sum over every ordered k-tuple of its probability times the gradient of the stage's loss on that tuple alone.

EOS, T_MAX = 0, 3


def eos_mdp(seed=0):
    """Every response, its prefixes' rows in the tables, and random tables: ``(ys, rows, mask, theta, ref, r)``.
    ``ys``, ``rows``, ``mask``: ``[N, T_MAX]``, ``rows[n, t]`` the table row of response n's prefix before token t."""
    prefixes: list[tuple] = [()]
    ys: list[tuple] = []
    for prefix in prefixes:  # grows as it goes: breadth first
        for v in range(V):
            y = (*prefix, v)
            if v == EOS or len(y) == T_MAX:
                ys.append(y)
            else:
                prefixes.append(y)
    row_of = {p: i for i, p in enumerate(prefixes)}
    tokens = torch.zeros(len(ys), T_MAX, dtype=torch.long)
    rows = torch.zeros(len(ys), T_MAX, dtype=torch.long)
    mask = torch.zeros(len(ys), T_MAX, dtype=torch.float64)
    for n, y in enumerate(ys):
        for t, v in enumerate(y):
            tokens[n, t], rows[n, t], mask[n, t] = v, row_of[y[:t]], 1.0
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.softmax(torch.randn(len(prefixes), V, generator=g, dtype=torch.float64) * 1.5, -1)
    reward = torch.randn(len(ys), generator=g, dtype=torch.float64)
    return tokens, rows, mask, theta, ref, reward


def eos_logprobs(table_logp, tokens, rows, mask):
    return torch.where(mask.bool(), table_logp[rows, tokens], 0.0)


def eos_expected_update(name, kwargs, advantage, k, normalization, kl_in_loss=None):
    """``T_MAX`` times minus the expected gradient of the stage's loss on a minibatch of ``k`` sampled responses,
    normalised as ``normalization`` says (``rl.loss_normalizer``), and the exact gradient of the stated
    objective: ``(update, gradient)``, each flattened."""
    tokens, rows, mask, theta, ref, reward = eos_mdp()
    logp = eos_logprobs(torch.log_softmax(theta, -1), tokens, rows, mask)
    ref_lp = eos_logprobs(ref.log(), tokens, rows, mask)
    regularizer = (
        torch.zeros(len(tokens), dtype=torch.float64)
        if kl_in_loss
        else PEN.get_penalty(name).regularizer(logp, ref_lp, mask, **kwargs)
    )
    if kl_in_loss:  # the KL in the loss: the objective is (2.3) for k2
        regularizer = ((logp - ref_lp) * mask).sum(-1)
    pi = logp.sum(-1).exp()
    (gradient,) = torch.autograd.grad((pi * (reward - COEF * regularizer)).sum(), theta, retain_graph=True)

    tuples = torch.tensor(list(itertools.product(range(len(tokens)), repeat=k)))  # [M, k]
    i = tuples.reshape(-1)
    lp, old, ref_i, m = logp[i], logp.detach()[i], ref_lp[i], mask[i]
    weight = old.sum(-1).exp().reshape(-1, k).prod(-1)  # [M]: each tuple's probability
    none = torch.zeros_like(old)
    per_token = none if kl_in_loss else PEN.get_penalty(name).penalty(old, ref_i, m, **kwargs)
    rewards = rl.shape_rewards(reward[i], per_token, m, COEF, beta=1.0, clip=math.inf)
    if advantage == "gae":
        adv, _ = rl.gae(rewards, none, m, gamma=1.0, lam=1.0)
    else:
        adv = rl.sequence_advantages_to_tokens(rl.SEQUENCE_ADVANTAGES[advantage](rewards.sum(-1), k), m)

    def minibatch_loss(lp, old, ref_lp, adv, m):
        normalizer = rl.loss_normalizer(m, normalization, T_MAX)
        loss, _ = rl.ppo_policy_loss(lp, old, adv, m, 0.2, normalizer)
        if kl_in_loss:  # as the stage adds it: summed over responses, divided like the policy loss
            loss = loss + COEF * rl.kl_loss(lp, ref_lp, m, kl_in_loss).sum() / normalizer
        return loss

    shaped = [t.reshape(-1, k, T_MAX) for t in (lp, old, ref_i, adv, m)]
    losses = torch.func.vmap(minibatch_loss)(*shaped)  # [M]
    (update,) = torch.autograd.grad((weight * losses).sum(), theta)
    return -T_MAX * update.flatten(), gradient.flatten()


def distance_from_nearest_multiple(u, g):
    """``|u - c g| / |u|`` at the best ``c``: 0 when the update points along the gradient."""
    c = (u @ g) / (g @ g)
    return ((u - c * g).norm() / u.norm()).item()


LENGTH_CASES = [
    (name, kwargs, advantage, k)
    for name, kwargs in CASES
    for advantage, ks in (("gae", (1, 2, 3)), ("rloo", (2, 3)), ("group_mean", (2, 3)))
    for k in ks
]


@pytest.mark.parametrize("name,kwargs,advantage,k", LENGTH_CASES)
def test_constant_normalizer_is_exact_and_token_mean_is_not_when_lengths_vary(name, kwargs, advantage, k):
    """Dividing by responses x max_new_tokens gives the exact gradient (times (k - 1) / k for the group mean, whose
    baseline holds the sample itself); dividing by the minibatch's token count does not point along it."""
    update, gradient = eos_expected_update(name, kwargs, advantage, k, "constant")
    factor = (k - 1) / k if advantage == "group_mean" else 1.0
    torch.testing.assert_close(update, factor * gradient, atol=1e-10, rtol=0)
    biased, gradient = eos_expected_update(name, kwargs, advantage, k, "token_mean")
    assert distance_from_nearest_multiple(biased, gradient) > 1e-3


@pytest.mark.parametrize("advantage,k", [("gae", 1), ("gae", 3), ("rloo", 2), ("rloo", 3)])
def test_k2_in_the_loss_is_exact_with_the_constant_normalizer(advantage, k):
    update, gradient = eos_expected_update("kl", {}, advantage, k, "constant", kl_in_loss="k2")
    torch.testing.assert_close(update, gradient, atol=1e-10, rtol=0)
    biased, gradient = eos_expected_update("kl", {}, advantage, k, "token_mean", kl_in_loss="k2")
    assert distance_from_nearest_multiple(biased, gradient) > 1e-3


def test_the_eos_mdp_has_every_length_and_truncation():
    tokens, _, mask, *_ = eos_mdp()
    lengths = mask.sum(-1)
    assert set(lengths.tolist()) == {1.0, 2.0, 3.0}
    assert len(tokens) == 15
    assert ((lengths == T_MAX) & (tokens[:, -1] != EOS)).any()  # cut, not ended
