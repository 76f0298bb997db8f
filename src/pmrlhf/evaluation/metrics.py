"""The paper's Sec. 6.1 metrics for any policy, from samples: PM divergence, length, perplexity, entropy, KL.

For every prompt two responses are drawn from the policy; their sequence log-probabilities come with the
samples, the reference's and the reward model's by teacher forcing. Nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmrlhf.models.scoring import reward_scores, sequence_logprobs
from pmrlhf.objectives.preference import btl, instance_pm_divergence, pairwise


@dataclass
class Samples:
    """Two sampled responses per prompt and what the three models say of them; tensors are ``[N]``."""

    responses: list[tuple[list[int], list[int]]]
    logp: tuple[torch.Tensor, torch.Tensor]  # log pi(y1|x), log pi(y2|x)
    ref_logp: tuple[torch.Tensor, torch.Tensor]  # log pi_ref(y1|x), log pi_ref(y2|x)
    reward: tuple[torch.Tensor, torch.Tensor]  # r_theta(x, y1), r_theta(x, y2)
    length: tuple[torch.Tensor, torch.Tensor]  # tokens of y1, y2 (end-of-sequence included)


@torch.no_grad()
def sample_pairs(
    policy,
    reference,
    reward_model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_p: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> Samples:
    """Draw y1, y2 ~ policy(.|x) for every prompt and score both with all three models."""
    from pmrlhf.models.sampling import generate

    pad_id = tokenizer.pad_token_id
    doubled = [p for p in prompts for _ in range(2)]
    responses, logps = generate(policy, doubled, tokenizer, max_new_tokens, top_p, temperature, batch_size)
    logp = torch.tensor([sum(lp) for lp in logps], dtype=torch.float64)
    ref_logp, length = sequence_logprobs(reference, doubled, responses, pad_id, batch_size)
    reward = reward_scores(reward_model, doubled, responses, pad_id, batch_size)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        return x[0::2], x[1::2]

    pairs = list(zip(responses[0::2], responses[1::2], strict=True))
    return Samples(pairs, split(logp), split(ref_logp), split(reward), split(length))


def texts_of(samples: Samples, tokenizer) -> list[tuple[str, str]]:
    """Each sampled pair as text, special tokens (the end of sequence) left out."""
    return [tuple(tokenizer.decode(y, skip_special_tokens=True).strip() for y in pair) for pair in samples.responses]


def sec61_metrics(s: Samples, beta: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Aggregate metrics and per-instance values (for histograms and CDFs, Figs. 5-8).

    * PM divergence: mean over prompts of ``KL(p_llm(.|y1,y2,x) || p_reward(.|y1,y2,x))``, ``p_reward`` from
      ``r / beta``;
    * length: mean response length in tokens;
    * perplexity: mean over responses of ``pi(y|x)^(-1/len(y))``;
    * entropy: ``E[-log pi(y|x)]``; KL: ``E[log pi(y|x) - log pi_ref(y|x)]``.
    """
    inst = instance_pm_divergence(s.logp[0], s.logp[1], s.reward[0], s.reward[1], beta)
    logp = torch.cat(s.logp)
    ref_logp = torch.cat(s.ref_logp)
    length = torch.cat(s.length).clamp(min=1)
    summary = {
        "pm_divergence": inst.mean().item(),
        "length": length.mean().item(),
        "perplexity": torch.exp(-logp / length).mean().item(),
        "entropy": (-logp).mean().item(),
        "kl": (logp - ref_logp).mean().item(),
        "reward": torch.cat(s.reward).mean().item(),
        "n_prompts": len(s.responses),
    }
    instances = {
        "pm_divergence": inst.tolist(),
        "p_llm": pairwise(s.logp[0], s.logp[1]).tolist(),
        "p_reward": btl(s.reward[0], s.reward[1], beta).tolist(),
    }
    return summary, instances
