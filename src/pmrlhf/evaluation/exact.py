"""Exact evaluation in the synthetic world: a model's whole distribution over M(x), teacher-forced.

For every prompt the policy's probability of each meaningful response (including its end-of-sequence
token) is computed exactly, so distances to the closed forms of ``objectives.optimal`` and to the ground
truth need no sampling. The mass outside M(x) is ``1 - sum_{y in M(x)} pi(y|x)``: unnatural text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pmrlhf.data.tokenize import Encoder
from pmrlhf.data.world import World
from pmrlhf.models.scoring import reward_scores, sequence_logprobs


@dataclass
class OverM:
    """Per prompt, over the k responses of M(x): ``logp [P, k]`` (the model's log pi(y|x)) and ``mask``."""

    logp: torch.Tensor
    mask: torch.Tensor  # False where a prompt has fewer than k responses

    @property
    def mass(self) -> torch.Tensor:
        """``pi(M(x) | x)`` per prompt, ``[P]``."""
        return torch.where(self.mask, self.logp.exp(), 0).sum(-1)

    @property
    def conditional(self) -> torch.Tensor:
        """``pi(y | M(x), x)``, ``[P, k]``: the model's preferences among the meaningful responses."""
        return torch.softmax(self.logp.masked_fill(~self.mask, float("-inf")), -1)


def _pairs(world: World, encoder: Encoder) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    prompts, responses, where = [], [], []
    for i, p in enumerate(world.prompts):
        ids = encoder.prompt(p.prompt)
        for j, y in enumerate(p.responses):
            prompts.append(ids)
            responses.append(encoder.response(y))
            where.append((i, j))
    return prompts, responses, where


def _scatter(
    values: torch.Tensor, where: list[tuple[int, int]], P: int, k: int, fill: float
) -> tuple[torch.Tensor, ...]:
    out = torch.full((P, k), fill, dtype=torch.float64)
    mask = torch.zeros((P, k), dtype=torch.bool)
    for v, (i, j) in zip(values.tolist(), where, strict=True):
        out[i, j] = v
        mask[i, j] = True
    return out, mask


def policy_over_m(model, tokenizer, world: World) -> OverM:
    """The policy's exact log-probabilities of every response in M(x), for every prompt of the world."""
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts, responses, where = _pairs(world, encoder)
    logp, _ = sequence_logprobs(model, prompts, responses, tokenizer.pad_token_id)
    k = max(len(p.responses) for p in world.prompts)
    return OverM(*_scatter(logp, where, len(world.prompts), k, float("-inf")))


def rewards_over_m(reward_model, tokenizer, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's scores of every response in M(x): ``(scores [P, k], mask [P, k])``."""
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts, responses, where = _pairs(world, encoder)
    scores = reward_scores(reward_model, prompts, responses, tokenizer.pad_token_id)
    k = max(len(p.responses) for p in world.prompts)
    return _scatter(scores, where, len(world.prompts), k, 0.0)


def truth_over_m(world: World) -> dict[str, torch.Tensor]:
    """The world's r*, true proportions and q as ``[P, k]`` tensors, with the mask."""
    k = max(len(p.responses) for p in world.prompts)
    P = len(world.prompts)
    out = {name: torch.zeros(P, k, dtype=torch.float64) for name in ("reward", "truth", "ref")}
    mask = torch.zeros(P, k, dtype=torch.bool)
    for i, p in enumerate(world.prompts):
        n = len(p.responses)
        out["reward"][i, :n] = torch.tensor(p.reward)
        out["truth"][i, :n] = torch.tensor(p.truth)
        out["ref"][i, :n] = torch.tensor(p.ref)
        mask[i, :n] = True
    out["mask"] = mask
    return out


def tv_rows(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total-variation distance per row over the masked entries, ``[P]``."""
    return 0.5 * torch.where(mask, (p - q).abs(), 0).sum(-1)


def pairwise_pm_divergence(logp: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact PM divergence over M(x): the mean, over every pair of meaningful responses of every prompt, of
    ``KL(p_llm(.|y1,y2,x) || p_reward(.|y1,y2,x))`` (Sec. 6.1 without sampling). ``reward`` already / beta."""
    from pmrlhf.objectives.preference import instance_pm_divergence

    k = logp.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1)
    d = instance_pm_divergence(logp[:, i], logp[:, j], reward[:, i], reward[:, j])
    valid = mask[:, i] & mask[:, j]
    return d[valid].mean()


@torch.no_grad()
def targets_mass_outside_m(
    reference,
    reward_model,
    tokenizer,
    world: World,
    ref: OverM,
    r: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    coef: float,
    alpha: float,
    max_new_tokens: int,
    samples: int,
    seed: int = 0,
) -> dict[str, float]:
    """How much mass the KL RLHF and conditional PM optima put outside M(x), averaged over prompts.

    Over M(x) both optima are exact (``r`` is ``r_theta / beta`` there). Off it they weigh each response by
    ``ref(y) e^{r(y)/coef}`` (KL; conditional PM where ``ref(y) < alpha``) or ``e^{r(y)/coef}`` (conditional
    PM where ``ref(y) >= alpha``). Their sums over every response the reference can write within
    ``max_new_tokens`` are estimated without bias from ``samples`` responses of the reference per prompt:
    ``sum_{y not in M} w(y) = E_{y ~ ref}[1{y not in M} w(y) / ref(y)]``. The sampling is seeded and leaves the
    caller's random state as it was. PM's optimum is left out: ``e^r`` over all text has no useful estimate.
    """
    from pmrlhf.stages.rollout import generate

    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts = [encoder.prompt(p.prompt) for p in world.prompts]
    in_m = [{tuple(encoder.response(y)) for y in p.responses} for p in world.prompts]
    repeated = [ids for ids in prompts for _ in range(samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses, logps = generate(reference, repeated, tokenizer, max_new_tokens, 1.0, 1.0, batch_size=256)
    scores = reward_scores(reward_model, repeated, responses, tokenizer.pad_token_id).double() / beta / coef
    ref_logp = torch.tensor([sum(lp) for lp in logps], dtype=torch.float64)
    off = torch.tensor([tuple(y) not in in_m[i // samples] for i, y in enumerate(responses)])
    # log of w(y) / ref(y) for each sampled response off M(x); -inf on M(x), whose part is exact below
    kl_terms = torch.where(off, scores, float("-inf")).reshape(-1, samples)
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")  # alpha 0: every response is in M(x) for PM
    cpm_scores = torch.where(ref_logp >= log_alpha, scores - ref_logp, scores)
    cpm_terms = torch.where(off, cpm_scores, float("-inf")).reshape(-1, samples)
    log_n = math.log(samples)
    ref_logp_m = ref.logp.masked_fill(~mask, float("-inf"))
    r_c = (r / coef).masked_fill(~mask, float("-inf"))
    kl_in = torch.logsumexp(ref_logp_m + r_c, -1)
    cpm_in = torch.logsumexp(torch.where(ref_logp_m >= log_alpha, r_c, ref_logp_m + r_c), -1)
    out = {}
    for name, inside, terms in (("kl_target", kl_in, kl_terms), ("cpm_target", cpm_in, cpm_terms)):
        outside = torch.logsumexp(terms, -1) - log_n
        out[f"{name}_mass_outside_m"] = torch.sigmoid(outside - inside).mean().item()
    return out


@torch.no_grad()
def compare_with_closed_forms(
    policy,
    reference,
    reward_model,
    tokenizer,
    world_path,
    beta: float,
    coef: float,
    alpha: float,
    policy_dist: OverM | None = None,
    max_new_tokens: int = 0,
    reference_samples: int = 256,
) -> dict[str, float]:
    """Where a trained policy sits among the closed forms of ``objectives.optimal``, exactly, over M(x).

    With ``r = r_theta / beta`` from the reward model and the reference's sequence probabilities, the optima
    of the penalised objectives restricted to M(x) are: KL RLHF ``ref * e^{r / coef}`` (eq. (5.1)), PM
    ``e^{r / coef}`` (eq. (3.2) when coef = 1) and conditional PM ``e^{r / coef}`` on {ref >= alpha},
    ``ref * e^{r / coef}`` off it (Thm. 4). Distances are total variation between the policy's conditional
    distribution over M(x) and each target, averaged over prompts. ``policy_dist``: the policy's
    ``policy_over_m``, when the caller already has it. With ``max_new_tokens`` > 0, the optima's mass outside
    M(x) is estimated too (``targets_mass_outside_m``), from ``reference_samples`` samples per prompt.
    """
    from pmrlhf.objectives import optimal

    world = World.load(world_path)
    pol = policy_dist if policy_dist is not None else policy_over_m(policy, tokenizer, world)
    ref = policy_over_m(reference, tokenizer, world)
    scores, mask = rewards_over_m(reward_model, tokenizer, world)
    truth = truth_over_m(world)
    r = (scores / beta).masked_fill(~mask, float("-inf"))
    ref_seq = torch.where(mask, ref.logp.exp(), 0)
    targets = {
        "kl_target": optimal.kl_rlhf(r, ref_seq, coef),
        "pm_target": optimal.max_entropy(r, coef),
        "cpm_target": optimal.conditional_pm(r / coef, ref_seq, alpha),
        "reward_model": optimal.preference_matching(r),
        "truth": truth["truth"],
    }
    out: dict[str, float] = {}
    for model_name, dist in (("", pol), ("reference_", ref)):
        for target_name, target in targets.items():
            out[f"{model_name}tv_to_{target_name}"] = tv_rows(dist.conditional, target, mask).mean().item()
        out[f"{model_name}mass_outside_m"] = (1 - dist.mass).mean().item()
        out[f"{model_name}pm_divergence_over_m"] = pairwise_pm_divergence(
            dist.logp, torch.where(mask, scores / beta, 0.0), mask
        ).item()
    out["reward_model_tv_to_truth"] = tv_rows(targets["reward_model"], truth["truth"], mask).mean().item()
    if max_new_tokens > 0:
        out |= targets_mass_outside_m(
            reference,
            reward_model,
            tokenizer,
            world,
            ref,
            r,
            mask,
            beta,
            coef,
            alpha,
            max_new_tokens,
            reference_samples,
        )
    return out
