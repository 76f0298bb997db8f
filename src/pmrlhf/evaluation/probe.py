"""Is preference collapse happening? The paper's Figs. 3-4 for any reference and reward model.

Pairs (y1, y2) are sampled from the reference; the reference's own preference ``p_ref(y1)`` comes from its
sequence log-probabilities and the reward model's ``p_reward(y1)`` from ``r / beta``. A pair is *collapsed*
when ``p_ref(y1) <= 0.01`` or ``>= 0.99``: there KL RLHF cannot follow the reward model (eq. (5.2)). Sec. 5.2
attributes this to length, so the rate is also given per difference in response length.
"""

from __future__ import annotations

import torch

from pmrlhf.evaluation.metrics import Samples
from pmrlhf.objectives.preference import btl, pairwise

COLLAPSE = 0.01
LENGTH_BINS = (0, 1, 2, 4, 8, 16)  # |len(y1) - len(y2)| in [0], [1], [2, 4), [4, 8), [8, 16), [16, inf)


def _bin_label(i: int) -> str:
    lo = LENGTH_BINS[i]
    hi = LENGTH_BINS[i + 1] if i + 1 < len(LENGTH_BINS) else None
    if hi is None:
        return f">={lo}"
    return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def probe(s: Samples, beta: float) -> tuple[dict, dict[str, list[float]]]:
    """Collapse statistics of reference-sampled pairs: ``(summary, per-pair values)``."""
    p_ref = pairwise(s.ref_logp[0], s.ref_logp[1])
    p_reward = btl(s.reward[0], s.reward[1], beta)
    diff = (s.length[0] - s.length[1]).abs()
    collapsed = (p_ref <= COLLAPSE) | (p_ref >= 1 - COLLAPSE)
    edges = torch.tensor(LENGTH_BINS, dtype=diff.dtype)
    which = torch.bucketize(diff, edges, right=True) - 1
    by_length = {}
    for i in range(len(LENGTH_BINS)):
        sel = which == i
        if sel.any():
            by_length[_bin_label(i)] = {"pairs": int(sel.sum()), "collapse_rate": collapsed[sel].float().mean().item()}
    summary = {
        "pairs": len(s.responses),
        "collapse_rate": collapsed.float().mean().item(),
        "reward_collapse_rate": ((p_reward <= COLLAPSE) | (p_reward >= 1 - COLLAPSE)).float().mean().item(),
        "collapse_rate_by_length_difference": by_length,
        "beta": beta,
    }
    return summary, {"p_ref": p_ref.tolist(), "p_reward": p_reward.tolist(), "length_difference": diff.tolist()}
