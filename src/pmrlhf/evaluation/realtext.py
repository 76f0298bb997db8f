"""Sec. 6.1's sampled metrics against the real-text world's truth, beside those against the reward model.

The truth is a function of the text (``data/realtext.py``), so for any two sampled answers the population's
preference ``P(y1 > y2)`` is known: the mixture of the two groups' Bradley-Terry preferences. The sampled PM
divergence against it is the paper's metric with ``p_reward`` replaced by that ``P``: the mean over sampled pairs
of ``KL(p_llm(.|y1, y2) || P(.|y1, y2))``, ``p_llm = pi(y1) / (pi(y1) + pi(y2))``.
"""

from __future__ import annotations

import torch

from pmrlhf.data import realtext
from pmrlhf.evaluation.metrics import Samples
from pmrlhf.objectives.preference import instance_pm_divergence


def truth_metrics(samples: Samples, pairs: list[tuple[str, str]], truth: dict) -> dict[str, float]:
    """The sampled PM divergence against the truth, the minority's share (answers of at most
    ``CONCISE_WORDS`` words), the mean length in words and sentiment, and the reference's perplexity of the
    policy's answers (how natural the reference finds them)."""
    flat = [t for pair in pairs for t in pair]
    majority, minority = realtext.group_rewards(flat)
    share, noise = truth["minority_share"], truth["label_noise"]
    p_true = torch.tensor(
        [
            realtext.preference(
                (majority[2 * i], minority[2 * i]), (majority[2 * i + 1], minority[2 * i + 1]), share, noise
            )
            for i in range(len(pairs))
        ],
        dtype=torch.float64,
    ).clamp(1e-12, 1 - 1e-12)
    logit = torch.log(p_true) - torch.log1p(-p_true)
    inst = instance_pm_divergence(samples.logp[0], samples.logp[1], logit, torch.zeros_like(logit), 1.0)
    ref_logp, length = torch.cat(samples.ref_logp), torch.cat(samples.length).clamp(min=1)
    n_words = [realtext.words(t) for t in flat]
    return {
        "pm_divergence_truth": inst.mean().item(),
        "minority_share": sum(n <= realtext.CONCISE_WORDS for n in n_words) / len(flat),
        "words": sum(n_words) / len(flat),
        "sentiment": sum(majority) / len(flat) / realtext.SENTIMENT_SCALE,
        "ref_perplexity": torch.exp(-ref_logp / length).mean().item(),
    }


def win_rates(pairs: list[tuple[str, str]], reference: list[tuple[str, str]], truth: dict) -> dict[str, float]:
    """How often each group, and the population, prefers the policy's answer to the reference's for the same
    prompt and draw (MaxMin-RLHF's win rate, with the labelers' known preferences in place of a judge)."""
    mine = [t for pair in pairs for t in pair]
    theirs = [t for pair in reference for t in pair]
    (a_maj, a_min), (b_maj, b_min) = realtext.group_rewards(mine), realtext.group_rewards(theirs)
    n, sig = len(mine), realtext.sigmoid
    return {
        "majority_win_rate": sum(sig(a - b) for a, b in zip(a_maj, b_maj, strict=True)) / n,
        "minority_win_rate": sum(sig(a - b) for a, b in zip(a_min, b_min, strict=True)) / n,
        "population_win_rate": sum(
            realtext.preference((a_maj[i], a_min[i]), (b_maj[i], b_min[i]), truth["minority_share"]) for i in range(n)
        )
        / n,
    }
