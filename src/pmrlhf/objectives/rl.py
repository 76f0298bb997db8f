"""Advantage estimation and PPO losses over padded token sequences.

Shapes: ``B`` sequences, ``T`` response tokens, right-padded; ``mask`` is 1 on response tokens. The policy loss
sums its masked token terms and divides by a ``normalizer`` fixed before sampling (``B * max_new_tokens``,
``loss_normalizer``), so that its expected gradient is a multiple of the objective's whatever the responses'
lengths; the token mean over the batch (``masked_mean``) divides by a count that depends on the samples, and its
expected gradient is not (``tests/test_objectives_exact.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (along ``dim``, or over everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whitening(
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    sum_over_workers: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / sqrt(var + eps))`` of ``x`` over the masked entries of every worker's part (the unbiased
    variance): what whitening advantages shifts and scales them by. ``sum_over_workers`` sums a scalar over every
    process holding part of the batch (an all-reduce), so the split does not change the result. A loss term that
    must keep its weight against whitened advantages is scaled by the second."""
    m = mask.to(x.dtype)
    n = sum_over_workers(m.sum()).clamp(min=1)
    mean = sum_over_workers((x * m).sum()) / n
    var = sum_over_workers((((x - mean) * m) ** 2).sum()) / (n - 1).clamp(min=1)
    return mean, torch.rsqrt(var + eps)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over response tokens.

    ``rewards``, ``values``, ``mask``: ``[B, T]``, the response tokens contiguous. The episode ends after the
    last masked token (the value beyond it is 0). The paper uses ``gamma = 1``, ``lam = 0.95``. Returns
    ``(advantages, returns)``, each ``[B, T]`` and 0 outside the mask; ``returns = advantages + values``.

    Naive equivalent, per sequence of length L::

        for t in reversed(range(L)):
            delta = r[t] + gamma * (v[t + 1] if t + 1 < L else 0) - v[t]
            a[t] = delta + gamma * lam * (a[t + 1] if t + 1 < L else 0)

    Computed as one product with the ``[T, T]`` matrix of discounts ``(gamma lam)^(k - t)``, ``k >= t``,
    instead of that loop over ``T``: the loop's dozens of small kernels per token were most of its cost.
    """
    m = mask.to(values.dtype)
    values = values * m
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = (rewards + gamma * next_values - values) * m  # 0 past the response, so the sums stop there
    steps = torch.arange(rewards.shape[1], device=values.device)
    ahead = steps[:, None] - steps[None, :]  # [k, t]: how far token k lies after token t
    discounts = torch.where(ahead >= 0, (gamma * lam) ** ahead.clamp(min=0).to(values.dtype), 0.0)
    advantages = (deltas @ discounts) * m
    return advantages, (advantages + values) * m


def rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024).

    ``scores``: ``[G * group_size]``, consecutive ``group_size`` entries being samples for one prompt.
    Returns ``score_i - mean_{j != i} score_j`` per sample, same shape.
    """
    s = _grouped(scores, group_size)
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baseline = (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    return (s - baseline).reshape(-1)


def group_mean(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Score minus the mean score of its prompt's group.

    The mean includes the sample itself, so the expected update is ``(group_size - 1) / group_size`` times the
    exact gradient (RLOO's leave-one-out baseline has no such factor): the same direction, a smaller step.
    """
    s = _grouped(scores, group_size)
    return (s - s.mean(-1, keepdim=True)).reshape(-1)


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(
            f"expected a flat tensor whose length is a multiple of {group_size}, got {tuple(scores.shape)}"
        )
    return scores.reshape(-1, group_size)


def sequence_advantages_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence ``[B]`` to its response tokens ``[B, T]`` (critic-free runs)."""
    return advantages[:, None] * mask.to(advantages.dtype)


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """A KL estimator of each whole response, to be differentiated in the loss (not used as a reward): ``[B]``.

    With ``d = log pi(y|x) - log pi_ref(y|x)`` summed over the response's tokens:
    ``k2 = d**2 / 2``, whose expected gradient on responses sampled from pi is exactly ``grad KL(pi || pi_ref)``
    (``E[d grad log pi(y)]``); ``k3 = exp(-d) - 1 + d``, whose expected gradient is exactly
    ``grad KL(pi_ref || pi)`` (``-sum_y pi_ref(y) grad log pi(y)``), the forward KL. Per-token versions of
    either (GRPO's) drop the KL of the tokens after each one: per-token k3's expected gradient misses the
    forward KL's (``tests/test_objectives_exact.py``).
    ``k1 = d`` is refused: its expected gradient is ``E[grad log pi(y)] = 0``.
    """
    d = ((logp - ref_logp) * mask.to(logp.dtype)).sum(-1)
    if estimator == "k2":
        return d.pow(2) / 2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(
        f"kl_loss takes estimator 'k2' or 'k3', got {estimator!r} (k1 in the loss has zero expected gradient: "
        "use it as a reward)"
    )


SEQUENCE_ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {"rloo": rloo, "group_mean": group_mean}

LOSS_NORMALIZATIONS = ("constant", "token_mean")


def loss_normalizer(mask: torch.Tensor, normalization: str, max_new_tokens: int) -> torch.Tensor:
    """What a minibatch's masked token sum is divided by: ``constant``, its responses times ``max_new_tokens``,
    a number that does not depend on what was sampled, so the expected update is ``1 / max_new_tokens`` times the
    exact gradient of the objective (as Dr. GRPO, Liu et al. 2025, divides by a constant); ``token_mean``, the
    number of its response tokens, as the paper's reference code and TRL divide: biased where lengths vary, since
    that count is random and correlated with the samples (``docs/ppo.md``, ``tests/test_objectives_exact.py``)."""
    if normalization == "token_mean":
        return mask.sum().to(torch.float32).clamp(min=1)
    if normalization != "constant":
        raise ValueError(f"loss normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    return torch.tensor(float(mask.shape[0] * max_new_tokens), device=mask.device)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al., 2017), as a loss to minimise.

    ``loss = sum_t max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)) / normalizer`` over the masked tokens, with
    ``ratio = exp(logp - old_logp)``; ``normalizer`` None divides by the number of masked tokens (the token mean,
    biased where lengths vary: ``loss_normalizer``). Stats (detached, token means): ``clipfrac`` (share of tokens
    where the clipped term is the active one) and ``approx_kl`` (the k3 estimate of KL(old || new), as in CleanRL).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    terms = torch.maximum(unclipped, clipped)
    loss = masked_mean(terms, mask) if normalizer is None else (terms * mask.to(terms.dtype)).sum() / normalizer
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean(
                ((values - returns) ** 2 < (clipped_values - returns) ** 2).to(values.dtype), mask
            )
        }
    return loss, stats


def shape_rewards(
    scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor, coef: float, beta: float = 1.0, clip: float = 5.0
) -> torch.Tensor:
    """Per-token RL rewards: ``-coef * penalty_t`` on every response token, plus the reward-model score
    ``clip(r_theta, -clip, clip) / beta`` on the last one.

    The clip applies to the score itself, as in the paper's reference code (DeepSpeed-Chat's
    ``compute_rewards`` clips ``r_theta`` to +-5), so the two ways of writing the paper's objective optimise the
    same thing: its code's ``clip(r_theta) - kl_ctl * penalty`` (``beta = 1``, ``coef = kl_ctl``) and Sec. 6's
    ``r_theta / beta - penalty`` (``coef = 1``) both have the optimum ``pi_ref e^{clip(r_theta) / kl_ctl}``.

    ``scores``: ``[B]``; ``penalty``, ``mask``: ``[B, T]`` (response tokens contiguous). Returns ``[B, T]``.
    Naive equivalent::

        for b in range(B):
            for t in response_positions(b):
                rewards[b, t] = -coef * penalty[b, t]
            rewards[b, last(b)] += clamp(scores[b], -clip, clip) / beta
    """
    m = mask.to(penalty.dtype)
    rewards = -coef * penalty * m
    T = mask.shape[1]
    last = (torch.arange(T, device=mask.device)[None] * mask.long()).argmax(-1)  # [B]
    score = (torch.clamp(scores, -clip, clip) / beta).to(rewards.dtype)
    has_tokens = mask.sum(-1) > 0
    bonus = torch.zeros_like(rewards).scatter(1, last[:, None], torch.where(has_tokens, score, 0)[:, None])
    return rewards + bonus


def adaptive_coef(coef: float, kl: float, target: float, responses: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: the penalty's coefficient moved so that the sequence KL approaches
    ``target``, by the clipped error times the share of ``horizon`` that an iteration's ``responses`` are."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * responses / horizon)
