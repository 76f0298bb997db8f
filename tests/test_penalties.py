import math

import pytest
import torch

from pmrlhf.objectives import penalties as PEN
from pmrlhf.objectives import rl


def batch(seed=0, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lengths = torch.tensor([7, 5, 1, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, ref_logp, mask


def seq(x, mask):
    return (x * mask).sum(-1)


def test_kl_k1_sums_to_the_sequence_log_ratio_and_ignores_padding():
    logp, ref_logp, mask = batch()
    pen = PEN.kl(logp, ref_logp, mask)
    torch.testing.assert_close(pen.sum(-1), seq(logp, mask) - seq(ref_logp, mask))
    assert (pen[mask == 0] == 0).all()


def test_kl_loss_k2_k3_known_values_on_the_whole_response():
    """k2 and k3 of the response's log-ratio (log 2 + log 2 over two tokens), not of each token's."""
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    d = 2 * math.log(2)
    mask = torch.ones(1, 2)
    torch.testing.assert_close(rl.kl_loss(logp, ref, mask, "k2"), torch.tensor([d**2 / 2]))
    torch.testing.assert_close(rl.kl_loss(logp, ref, mask, "k3"), torch.tensor([0.25 - 1 + d]))
    with pytest.raises(ValueError, match="k2' or 'k3"):
        rl.kl_loss(logp, ref, mask, "k4")


def test_k3_is_an_unbiased_kl_estimate():
    """E_{y~pi}[k3] = KL(pi || ref) for a categorical pi: checked exactly by enumeration."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    k3 = rl.kl_loss(pi.log()[:, None], ref.log()[:, None], torch.ones(3, 1), "k3")
    torch.testing.assert_close((pi * k3).sum(), (pi * (pi / ref).log()).sum())


def test_pm_sums_to_log_pi():
    logp, ref_logp, mask = batch(1)
    torch.testing.assert_close(PEN.pm(logp, ref_logp, mask).sum(-1), seq(logp, mask))


def test_cpm_sequence_is_def_4_1_per_response_with_the_condition_on_the_last_token():
    logp, ref_logp, mask = batch(2)
    alpha = math.exp(-2.5)
    pen = PEN.cpm_sequence(logp, ref_logp, mask, alpha=alpha)
    lp, lr = seq(logp, mask), seq(ref_logp, mask)
    expected = torch.where(lr >= math.log(alpha), lp, lp - lr)
    torch.testing.assert_close(pen.sum(-1), expected)
    # This batch has responses on both sides of the threshold, so both branches are exercised.
    assert (lr >= math.log(alpha)).any() and (lr < math.log(alpha)).any()
    # Every token but the last carries log pi alone: the condition depends on the whole response.
    last = mask.sum(-1) - 1
    for b in range(mask.shape[0]):
        torch.testing.assert_close(pen[b, : last[b]], logp[b, : last[b]])


def test_cpm_token_tests_each_token():
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.9]]))
    ref_logp = torch.log(torch.tensor([[0.6, 0.05, 0.3]]))
    pen = PEN.cpm_token(logp, ref_logp, torch.tensor([[1, 1, 0]]), alpha=0.3)
    expected = torch.tensor([[math.log(0.5), math.log(0.4) - math.log(0.05), 0.0]])
    torch.testing.assert_close(pen, expected)
    # The two readings differ: pi_ref(y|x) = 0.03 < 0.3 puts the whole response off M(x), and its reference
    # log-probability is added back on the last token.
    seq_pen = PEN.cpm_sequence(logp, ref_logp, torch.tensor([[1, 1, 0]]), alpha=0.3)
    torch.testing.assert_close(seq_pen, torch.tensor([[math.log(0.5), math.log(0.4 / (0.6 * 0.05)), 0.0]]))


def test_cpm_at_alpha_1_is_kl_and_at_tiny_alpha_is_pm():
    logp, ref_logp, mask = batch(3)
    torch.testing.assert_close(PEN.cpm_token(logp, ref_logp, mask, alpha=1.0), PEN.kl(logp, ref_logp, mask))
    torch.testing.assert_close(PEN.cpm_sequence(logp, ref_logp, mask, alpha=1e-30), PEN.pm(logp, ref_logp, mask))


def test_maxent_and_registry():
    logp, ref_logp, mask = batch(4)
    torch.testing.assert_close(PEN.maxent(logp, ref_logp, mask, tau=0.3), 0.3 * PEN.pm(logp, ref_logp, mask))
    assert set(PEN.PENALTIES) >= {"kl", "pm", "cpm_token", "cpm_sequence", "maxent"}
    assert PEN.get_penalty("cpm_token").penalty is PEN.cpm_token
    with pytest.raises(ValueError, match="unknown penalty 'entropy'"):
        PEN.get_penalty("entropy")
    with pytest.raises(ValueError, match="alpha"):
        PEN.cpm_token(logp, ref_logp, mask, alpha=0.0)


def test_penalties_do_not_mutate_inputs():
    logp, ref_logp, mask = batch(5)
    before = (logp.clone(), ref_logp.clone(), mask.clone())
    for rule in PEN.PENALTIES.values():
        rule.penalty(logp, ref_logp, mask, **rule.kwargs({}))
    for a, b in zip(before, (logp, ref_logp, mask), strict=True):
        assert torch.equal(a, b)
