"""The truth of a synthetic world over M(x), as tensors: what the population prefers, how its labels were drawn,
and what a model trained on those labels can learn of it."""

from __future__ import annotations

import torch

from pmrlhf.data.world import World


def truth_over_m(world: World) -> dict[str, torch.Tensor]:
    """The world's truth over M(x), with the mask: r*, the true proportions softmax(r*) and q as ``[P, k]``; the
    labels' probabilities (``label_preference``, the population's pairwise preference) and how often each pair is
    compared (``pair_weights``) as ``[P, k, k]``; and what pairwise training can learn from those labels, the BTL
    fit ``learnable_reward`` (``preference.btl_fit``) and its Plackett-Luce distribution ``learnable``. Where the
    labels are BTL in r* (no groups, no noise) the two agree; for a mixture of groups they do not, and the gap is
    what a single Bradley-Terry reward model (or DPO) loses of the truth even with unlimited data."""
    from pmrlhf.objectives.preference import btl_fit

    k = max(len(p.responses) for p in world.prompts)
    P = len(world.prompts)
    out = {name: torch.zeros(P, k, dtype=torch.float64) for name in ("reward", "truth", "ref")}
    out |= {name: torch.zeros(P, k, k, dtype=torch.float64) for name in ("label_preference", "pair_weights")}
    mask = torch.zeros(P, k, dtype=torch.bool)
    for i, p in enumerate(world.prompts):
        n = len(p.responses)
        out["reward"][i, :n] = torch.tensor(p.reward, dtype=torch.float64)
        out["truth"][i, :n] = torch.tensor(p.truth, dtype=torch.float64)
        out["ref"][i, :n] = torch.tensor(p.ref, dtype=torch.float64)
        out["label_preference"][i, :n, :n] = world.label_preference(p)
        out["pair_weights"][i, :n, :n] = world.pair_weights(p)
        mask[i, :n] = True
    out["mask"] = mask
    out["learnable_reward"] = btl_fit(out["label_preference"], out["pair_weights"], mask)
    out["learnable"] = torch.softmax(out["learnable_reward"].masked_fill(~mask, float("-inf")), -1)
    return out


def reward_model_gap(scores: torch.Tensor, mask: torch.Tensor, world: World) -> dict[str, float]:
    """How far the reward model's pairwise preferences ``sigma(r_theta(y1) - r_theta(y2))`` are, on average over
    every pair of distinct responses in M(x), from the labels' (``pair_gap_to_truth``: the population's, which a
    single BTL model cannot represent where the labelers are a mixture of groups) and from the BTL fit of the
    labels that pairwise training converges to (``pair_gap_to_learnable``); ``scores``, ``mask`` as
    ``rewards_over_m`` gives them."""
    truth = truth_over_m(world)
    learned = torch.sigmoid(scores[:, :, None] - scores[:, None, :])
    fit = truth["learnable_reward"]
    learnable = torch.sigmoid(fit[:, :, None] - fit[:, None, :])
    pairs = mask[:, :, None] & mask[:, None, :] & ~torch.eye(mask.shape[1], dtype=torch.bool)[None]
    return {
        "pair_gap_to_truth": (learned - truth["label_preference"]).abs()[pairs].mean().item(),
        "pair_gap_to_learnable": (learned - learnable).abs()[pairs].mean().item(),
    }
