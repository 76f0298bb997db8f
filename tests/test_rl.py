import math

import pytest
import torch

from pmrlhf.objectives import rl


def slow_gae(rewards, values, starts, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b, (s, L) in enumerate(zip(starts, lengths, strict=True)):
        last = 0.0
        for t in reversed(range(s, s + L)):
            next_v = values[b, t + 1].item() if t + 1 < s + L else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_a_slow_reference_loop(gamma, lam):
    """Responses start after prompts of different lengths and end before padding, as in a rollout."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 12
    starts, lengths = [0, 2, 3, 1, 4, 11], [9, 4, 1, 7, 8, 1]
    t = torch.arange(T)[None]
    mask = (t >= torch.tensor(starts)[:, None]) & (t < torch.tensor(starts)[:, None] + torch.tensor(lengths)[:, None])
    mask = mask.long()
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage outside the mask must not leak in
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, slow_gae(rewards, values, starts, lengths, gamma, lam))
    torch.testing.assert_close(ret, (adv + values) * mask)


def test_gae_with_lambda_1_and_gamma_1_is_return_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = rl.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 2.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.5, 1.0, 0.5]]))


def test_rloo_and_group_mean():
    s = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(rl.rloo(s, 3), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, -1.5, -1.5, 3.0]))
    torch.testing.assert_close(rl.group_mean(s, 3), torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))
    # RLOO is the group-mean advantage rescaled by k / (k - 1).
    torch.testing.assert_close(rl.rloo(s, 3), rl.group_mean(s, 3) * 3 / 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        rl.rloo(s, 4)


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    mean, inv_std = rl.whitening(x, mask)
    torch.testing.assert_close((x - mean) * inv_std * mask, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_ppo_policy_loss_hand_values():
    # ratio e with A = +1 clips to 1.2 (loss -1.2); ratio e^-1 with A = -1 clips to 0.8 (loss 0.8)
    logp = torch.tensor([[1.0, -1.0, 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = rl.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1.0))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(((math.e - 2) + (math.exp(-1))) / 2))
    # Inside the trust region the loss is -A ratio and nothing is clipped.
    loss, stats = rl.ppo_policy_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(-2 * math.exp(0.1)))
    assert stats["clipfrac"] == 0


def test_ppo_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, _ = rl.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: both 1.
    torch.testing.assert_close(loss, torch.tensor(0.5 * (3.24 + 1.0) / 2))


def test_token_mean_losses_are_split_invariant():
    """A batch split across two workers, each loss weighted by its token count, equals the full batch."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 8
    logp, old, adv = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = (torch.arange(T)[None] < torch.tensor([8, 3, 5, 1, 7, 2])[:, None]).long()
    full, _ = rl.ppo_policy_loss(logp, old, adv, mask)
    parts = [
        rl.ppo_policy_loss(logp[s], old[s], adv[s], mask[s])[0] * mask[s].sum() for s in (slice(0, 2), slice(2, 6))
    ]
    torch.testing.assert_close(sum(parts) / mask.sum(), full)


def test_shape_rewards_puts_the_clipped_score_over_beta_on_the_last_token():
    """The clip applies to r_theta itself (the reference code's rule), then the score is divided by beta: 3 is
    kept and halved to 6, -40 clipped to -5 and halved to -10."""
    penalty = torch.tensor([[0.0, 1.0, 2.0, 9.0], [0.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    rewards = rl.shape_rewards(torch.tensor([3.0, -40.0]), penalty, mask, coef=0.1, beta=0.5, clip=5.0)
    expected = torch.tensor([[0.0, -0.1, -0.2 + 6.0, 0.0], [0.0, -0.05 - 10.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # Summed over tokens: the score minus coef times the sequence penalty.
    torch.testing.assert_close(rewards.sum(-1), torch.tensor([6.0 - 0.3, -10.0 - 0.05]))
    # The reference code's form (beta 1, coefficient kl_ctl = 0.5) is the same reward scaled by beta.
    code = rl.shape_rewards(torch.tensor([3.0, -40.0]), penalty, mask, coef=0.1 * 0.5, beta=1.0, clip=5.0)
    torch.testing.assert_close(code, 0.5 * rewards)
