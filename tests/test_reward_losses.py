import math

import torch
import torch.nn.functional as F

from pmrlhf.objectives.reward import kwise_loss, listwise_loss, pair_accuracy


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Eq. (2.2): ``-mean log sigmoid(r(x, y_w) - r(x, y_l))``, the reference the losses are checked against."""
    return -F.logsigmoid(chosen - rejected).mean()


def test_pairwise_is_eq_2_2():
    """A comparison is a ranking of two: the K-wise loss on it is eq. (2.2)."""
    torch.testing.assert_close(
        kwise_loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]])),
        torch.tensor((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2),
    )


def test_kwise_averages_all_pairs_and_reduces_to_pairwise_for_k2():
    s = torch.tensor([[3.0, 1.0, 0.0]])
    pairs = [(3.0, 1.0), (3.0, 0.0), (1.0, 0.0)]
    expected = sum(-F.logsigmoid(torch.tensor(a - b)) for a, b in pairs) / 3
    torch.testing.assert_close(kwise_loss(s), expected)
    two = torch.tensor([[0.5, 1.5], [2.0, -1.0]])
    torch.testing.assert_close(kwise_loss(two), pairwise_loss(two[:, 0], two[:, 1]))


def test_kwise_with_mixed_k_masks_padding():
    s = torch.tensor([[3.0, 1.0, 0.0], [0.5, 1.5, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = (kwise_loss(s[:1]) + pairwise_loss(torch.tensor([0.5]), torch.tensor([1.5]))) / 2
    torch.testing.assert_close(kwise_loss(s, mask), expected)


def test_listwise_is_the_plackett_luce_nll():
    s = torch.tensor([[2.0, 1.0, 0.0]])
    # P(ranking) = e^2/(e^2+e^1+e^0) * e^1/(e^1+e^0)
    p = math.exp(2) / (math.exp(2) + math.exp(1) + 1) * math.exp(1) / (math.exp(1) + 1)
    torch.testing.assert_close(listwise_loss(s), torch.tensor(-math.log(p)))
    # For K = 2 it equals the pairwise loss; padding is ignored.
    torch.testing.assert_close(
        listwise_loss(torch.tensor([[0.3, 1.0, 5.0]]), torch.tensor([[1, 1, 0]])),
        pairwise_loss(torch.tensor([0.3]), torch.tensor([1.0])),
    )


def test_pair_accuracy_and_margin():
    acc, margin = pair_accuracy(torch.tensor([[3.0, 1.0, 2.0]]))
    torch.testing.assert_close(acc, torch.tensor(2 / 3))
    torch.testing.assert_close(margin, torch.tensor((2.0 + 1.0 - 1.0) / 3))
