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
from pmrlhf.evaluation.truth import truth_over_m
from pmrlhf.models.scoring import response_token_logprobs, reward_scores


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
    out = torch.full((P, k, *values.shape[1:]), fill, dtype=torch.float64)
    mask = torch.zeros((P, k), dtype=torch.bool)
    for v, (i, j) in zip(values.double(), where, strict=True):
        out[i, j] = v
        mask[i, j] = True
    return out, mask


def policy_over_m(model, tokenizer, world: World) -> OverM:
    """The policy's exact log-probabilities of every response in M(x), for every prompt of the world."""
    return tokens_over_m(model, tokenizer, world).sequences


@dataclass
class TokensOverM:
    """Per prompt and response of M(x), the model's log-probability of each token: ``logp [P, k, L]``, ``tokens``
    the response-token mask ``[P, k, L]``, ``mask [P, k]`` as in ``OverM``."""

    logp: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def sequences(self) -> OverM:
        return OverM(torch.where(self.mask, (self.logp * self.tokens).sum(-1).double(), float("-inf")), self.mask)

    def optimum_terms(self, penalty: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``penalties.optimum_terms`` ``(s, c)`` of every response, reading this model as the reference,
        ``[P, k]`` each."""
        from pmrlhf.objectives.penalties import optimum_terms

        P, k, L = self.logp.shape
        s, c = optimum_terms(penalty, self.logp.reshape(P * k, L).double(), self.tokens.reshape(P * k, L), **kwargs)
        return torch.where(self.mask, s.reshape(P, k), 1.0), torch.where(self.mask, c.reshape(P, k), 0.0)


def tokens_over_m(model, tokenizer, world: World) -> TokensOverM:
    """The model's teacher-forced log-probability of every token of every response in M(x)."""
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts, responses, where = _pairs(world, encoder)
    logp, tokens = response_token_logprobs(model, prompts, responses, tokenizer.pad_token_id)
    P, k, L = len(world.prompts), max(len(p.responses) for p in world.prompts), logp.shape[1]
    out = torch.zeros(P, k, L)
    marks = torch.zeros(P, k, L)
    mask = torch.zeros(P, k, dtype=torch.bool)
    for row, (i, j) in enumerate(where):
        out[i, j], marks[i, j], mask[i, j] = logp[row], tokens[row], True
    return TokensOverM(out, marks, mask)


def lengths_over_m(tokenizer, world: World) -> torch.Tensor:
    """The number of tokens of every response in M(x), end-of-sequence included, ``[P, k]`` (0 where absent)."""
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    _, responses, where = _pairs(world, encoder)
    k = max(len(p.responses) for p in world.prompts)
    return _scatter(torch.tensor([float(len(y)) for y in responses]), where, len(world.prompts), k, 0.0)[0]


def rewards_over_m(reward_model, tokenizer, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's scores of every response in M(x): ``(scores [P, k], mask [P, k])``; a mixture's
    ``[P, k, G]``."""
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts, responses, where = _pairs(world, encoder)
    scores = reward_scores(reward_model, prompts, responses, tokenizer.pad_token_id)
    k = max(len(p.responses) for p in world.prompts)
    return _scatter(scores, where, len(world.prompts), k, 0.0)


def tv_rows(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total-variation distance per row over the masked entries, ``[P]``."""
    return 0.5 * torch.where(mask, (p - q).abs(), 0).sum(-1)


def pairwise_pm_divergence(logp: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact PM divergence over M(x), each pair of distinct meaningful responses weighted alike: the mean of
    ``KL(p_llm(.|y1,y2,x) || p_reward(.|y1,y2,x))`` over every such pair of every prompt. ``reward`` already
    / beta. It asks how well the policy's preferences match the reward model's, whatever it samples."""
    from pmrlhf.objectives.preference import instance_pm_divergence

    k = logp.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1)
    d = instance_pm_divergence(logp[:, i], logp[:, j], reward[:, i], reward[:, j])
    valid = mask[:, i] & mask[:, j]
    return d[valid].mean()


def policy_pairs_pm_divergence(logp: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sec. 6.1's population PM divergence without sampling, over M(x): the expectation of the instance
    divergence over pairs drawn from ``pi (x) pi`` conditional on both lying in M(x), identical pairs (which
    score 0) included, averaged over prompts. What the sampled column estimates, less the pairs outside M(x). A
    policy that puts all its mass on one response scores 0 here, however wrong its preferences."""
    from pmrlhf.objectives.preference import instance_pm_divergence

    d = instance_pm_divergence(logp[:, :, None], logp[:, None, :], reward[:, :, None], reward[:, None, :])
    pair = mask[:, :, None] & mask[:, None, :]
    d = torch.where(pair, d, 0.0)
    w = torch.softmax(logp.masked_fill(~mask, float("-inf")), -1)  # pi(y | M(x), x)
    return (w[:, :, None] * w[:, None, :] * d).sum((-2, -1)).mean()


def effective_reward(scores: torch.Tensor, objective: dict) -> torch.Tensor:
    """The reward a run optimised, before its coefficient, from reward-model scores: for PPO the score
    standardised as the run last did (``normalize_reward``), clipped to ``+-clip_reward_value`` and divided by
    ``beta``, as ``rl.shape_rewards`` builds it; for DPO the score itself."""
    if objective["method"] == "dpo":
        return scores
    norm = objective.get("reward_normalization")
    if norm:
        scores = (scores - norm["mean"]) / norm["std"]
    clip = objective.get("clip_reward_value")
    if clip is not None:
        scores = torch.clamp(scores, -clip, clip)
    return scores / objective["beta"]


def reward_beta(objective: dict) -> float:
    """The beta of the reward model's preferences ``p_reward`` (scores over beta) a run is compared with: PPO's
    reward is ``r / beta``; a DPO-family loss's beta is the temperature of its optimum instead, so 1."""
    return 1.0 if objective["method"] == "dpo" else float(objective["beta"])


def objective_coef(objective: dict) -> float:
    """The temperature of a run's optimum: PPO's penalty coefficient (as it ended), DPO's beta."""
    return objective["beta"] if objective["method"] == "dpo" else objective["coef"]


def own_target(
    objective: dict,
    r: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor,
    ref_tokens: TokensOverM | None = None,
    lengths: torch.Tensor | None = None,
    labels: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The optimum over M(x) of the objective the run optimised, ``[P, k]``, conditional on M(x); None where
    it is not determined by M(x) alone (the forward KL's normaliser runs over every response).

    ``r``: ``effective_reward`` (-inf off the mask); ``ref``: the reference's sequence probabilities;
    ``ref_tokens``: the reference's token log-probabilities (PPO: each penalty's ``optimum_terms``);
    ``lengths``: tokens per response (IPO, SimPO); ``labels``: for DPO, the world's ``label_preference`` and
    ``pair_weights`` (``truth_over_m``), what its losses are minimised under.
    """
    from pmrlhf.objectives import dpo, optimal

    coef, alpha = objective_coef(objective), objective.get("alpha") or 0.0
    if objective["method"] == "dpo":
        return dpo.implicit_target(
            objective["loss"],
            torch.where(mask, r, 0.0),
            ref,
            coef,
            alpha,
            label_smoothing=objective.get("label_smoothing", 0.0),
            simpo_gamma=objective.get("simpo_gamma", 1.0),
            lengths=lengths,
            mask=mask,
            preference=None if labels is None else labels["label_preference"],
            pair_weights=None if labels is None else labels["pair_weights"],
        )
    if objective.get("kl_estimator") == "k3":  # the forward KL(pi_ref || pi), recorded only for the kl penalty
        return None
    s, c = ref_tokens.optimum_terms(objective["penalty"], **penalty_kwargs(objective))
    return optimal.pm_with_reference(r / (coef * s), c / s)


def family(objective: dict) -> str | None:
    """The family of a PPO run's penalty (``penalties.PenaltyRule.family``); None for any other run."""
    from pmrlhf.objectives.penalties import get_penalty

    return get_penalty(objective["penalty"]).family if objective.get("method") == "ppo" else None


def penalty_kwargs(objective: dict) -> dict:
    """The keyword arguments of a PPO run's penalty, from its recorded objective (``ppo.config.objective``)."""
    from pmrlhf.objectives.penalties import get_penalty

    return get_penalty(objective["penalty"]).kwargs(objective)


@torch.no_grad()
def targets_mass_outside_m(
    reference,
    reward_model,
    tokenizer,
    world: World,
    ref_tokens: TokensOverM,
    r: torch.Tensor,
    mask: torch.Tensor,
    objective: dict,
    max_new_tokens: int,
    samples: int,
    seed: int = 0,
) -> dict[str, float]:
    """How much mass the KL RLHF optimum of the run's reward and coefficient puts outside M(x), and for a
    conditional PM run its own optimum, averaged over prompts.

    Both weigh each response by ``e^{r(y)/coef + c(y)}``, with ``c`` the part of ``log pi_ref(y|x)`` the penalty
    keeps (``penalties.optimum_terms``, whose ``s`` is 1 for both; all of it for KL). Over M(x) that is exact
    (``r`` is ``effective_reward`` there). The sum over every other response the reference can write within
    ``max_new_tokens`` is estimated without bias from ``samples`` responses of the reference per prompt:
    ``sum_{y not in M} w(y) = E_{y ~ ref}[1{y not in M} w(y) / ref(y)]``. The mass outside is that sum over itself
    plus the exact sum over M(x): a ratio, so the estimate is consistent (exact as ``samples`` grows) but biased
    low for a finite number of heavy-tailed weights. The sampling is seeded and leaves the caller's random state
    as it was. PM's optimum is left out: ``e^r`` over all text has no useful estimate.
    """
    from pmrlhf.models.sampling import generate
    from pmrlhf.objectives.penalties import optimum_terms

    coef = objective_coef(objective)
    encoder = Encoder(tokenizer, max_prompt_tokens=10_000, max_response_tokens=10_000)
    prompts = [encoder.prompt(p.prompt) for p in world.prompts]
    in_m = [{tuple(encoder.response(y)) for y in p.responses} for p in world.prompts]
    repeated = [ids for ids in prompts for _ in range(samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses, logps = generate(reference, repeated, tokenizer, max_new_tokens, 1.0, 1.0, batch_size=256)
    raw = reward_scores(reward_model, repeated, responses, tokenizer.pad_token_id).double()
    scores = effective_reward(raw, objective) / coef
    width = max(len(lp) for lp in logps)
    token_ref = torch.zeros(len(logps), width, dtype=torch.float64)
    tokens = torch.zeros(len(logps), width)
    for i, lp in enumerate(logps):
        token_ref[i, : len(lp)], tokens[i, : len(lp)] = torch.tensor(lp, dtype=torch.float64), 1
    ref_logp = (token_ref * tokens).sum(-1)
    off = torch.tensor([tuple(y) not in in_m[i // samples] for i, y in enumerate(responses)])
    r_c = (r / coef).masked_fill(~mask, float("-inf"))
    rules = [("kl_target", "kl", {})]
    if family(objective) == "conditional":
        rules.append(("own_target", objective["penalty"], penalty_kwargs(objective)))
    out = {}
    for name, penalty, kwargs in rules:
        # log of w(y) / ref(y) for each sampled response off M(x); -inf on M(x), whose part is exact
        kept = optimum_terms(penalty, token_ref, tokens, **kwargs)[1]
        terms = torch.where(off, scores + kept - ref_logp, float("-inf")).reshape(-1, samples)
        inside = torch.logsumexp(r_c + ref_tokens.optimum_terms(penalty, **kwargs)[1], -1)
        outside = torch.logsumexp(terms, -1) - math.log(samples)
        out[f"{name}_mass_outside_m"] = torch.sigmoid(outside - inside).mean().item()
    return out


@torch.no_grad()
def compare_with_closed_forms(
    policy,
    reference,
    reward_model,
    tokenizer,
    world_path,
    objective: dict,
    policy_dist: OverM | None = None,
    max_new_tokens: int = 0,
    reference_samples: int = 256,
) -> dict[str, float]:
    """Where a trained policy sits among the closed forms of ``objectives.optimal``, exactly, over M(x).

    ``objective`` is what the run optimised, as its stage recorded it (``summary.json``'s ``objective``:
    method, penalty or loss, coefficient, alpha, beta, clipping, normalisation). With ``r`` the reward the run
    optimised (``effective_reward``) and ``coef`` its temperature, the optima restricted to M(x) are: KL RLHF
    ``ref * e^{r / coef}`` (eq. (5.1)), PM ``e^{r / coef}`` (eq. (3.2) when coef = 1), conditional PM
    (Def. 4.1) ``e^{r / coef}`` on {ref >= alpha}, ``ref * e^{r / coef}`` off it (Thm. 4; only for a run with an
    alpha), and the run's own (``own_target``, for DPO under the labels of its comparisons; ``tv_to_own_target``
    asks whether training converged). ``reward_model`` is the reward model's Plackett-Luce distribution
    ``e^{r_theta / beta}`` unclipped (does the method match preferences?); ``truth`` the population's
    proportions, and ``learnable`` the Plackett-Luce distribution of the labels' BTL fit (``truth_over_m``),
    where a pairwise reward model and DPO-family losses converge with unlimited data.
    Distances are total variation between the policy's conditional distribution over M(x) and each target,
    averaged over prompts. ``policy_dist``: the policy's ``policy_over_m``, when the caller already has it.
    With ``max_new_tokens`` > 0, the KL and conditional PM optima's mass outside M(x) is estimated too
    (``targets_mass_outside_m``), from ``reference_samples`` samples per prompt.
    """
    from pmrlhf.objectives import optimal

    world = World.load(world_path)
    pol = policy_dist if policy_dist is not None else policy_over_m(policy, tokenizer, world)
    ref_tokens = tokens_over_m(reference, tokenizer, world)
    ref = ref_tokens.sequences
    scores, mask = rewards_over_m(reward_model, tokenizer, world)
    truth = truth_over_m(world)
    coef, alpha = objective_coef(objective), objective.get("alpha") or 0.0
    r = effective_reward(scores, objective).masked_fill(~mask, float("-inf"))
    ref_seq = torch.where(mask, ref.logp.exp(), 0)
    beta = reward_beta(objective)
    lengths = lengths_over_m(tokenizer, world) if objective.get("loss") in ("ipo", "simpo") else None
    targets = {
        "kl_target": optimal.kl_rlhf(r, ref_seq, coef),
        "pm_target": optimal.max_entropy(r, coef),
        "reward_model": optimal.preference_matching((scores / beta).masked_fill(~mask, float("-inf"))),
        "truth": truth["truth"],
        "learnable": truth["learnable"],
    }
    if alpha:  # Def. 4.1 at the run's own alpha; at alpha 0 it would be the PM optimum again
        targets["cpm_target"] = optimal.conditional_pm(r / coef, ref_seq, alpha)
    # DPO never sees the reward model: its losses are minimised under the comparisons' labels, with the pairs as
    # often as the world shows them, so its optimum is taken there (at their BTL fit for the closed forms)
    dpo = objective["method"] == "dpo"
    own_r = truth["reward"].masked_fill(~mask, float("-inf")) if dpo else r
    own = own_target(objective, own_r, ref_seq, mask, ref_tokens, lengths, truth if dpo else None)
    out: dict[str, float] = {}
    rm = torch.where(mask, scores / beta, 0.0)  # the reward model's preferences the divergences are taken against
    for model_name, dist in (("", pol), ("reference_", ref)):
        for target_name, target in targets.items():
            out[f"{model_name}tv_to_{target_name}"] = tv_rows(dist.conditional, target, mask).mean().item()
        out[f"{model_name}tv_to_own_target"] = (
            tv_rows(dist.conditional, own, mask).mean().item() if own is not None else float("nan")
        )
        out[f"{model_name}mass_outside_m"] = (1 - dist.mass).mean().item()
        out[f"{model_name}pm_divergence_uniform_pairs"] = pairwise_pm_divergence(dist.logp, rm, mask).item()
        out[f"{model_name}pm_divergence_policy_pairs"] = policy_pairs_pm_divergence(dist.logp, rm, mask).item()
    if own is not None:  # how well the objective itself, solved exactly, matches the reward model's preferences
        own_logp = torch.log(own).masked_fill(~mask, float("-inf"))
        out["own_target_pm_divergence_uniform_pairs"] = pairwise_pm_divergence(own_logp, rm, mask).item()
    out["reward_model_tv_to_truth"] = tv_rows(targets["reward_model"], truth["truth"], mask).mean().item()
    out["reward_model_tv_to_learnable"] = tv_rows(targets["reward_model"], truth["learnable"], mask).mean().item()
    out["learnable_tv_to_truth"] = tv_rows(truth["learnable"], truth["truth"], mask).mean().item()
    if objective["method"] == "ppo" and objective.get("clip_reward_value") is not None:
        clip = objective["clip_reward_value"]
        norm = objective.get("reward_normalization") or {"mean": 0.0, "std": 1.0}
        clipped = ((scores - norm["mean"]).abs() > clip * norm["std"]) & mask
        out["clipped_share_over_m"] = (clipped.sum() / mask.sum()).item()
    if max_new_tokens > 0:
        out |= targets_mass_outside_m(
            reference,
            reward_model,
            tokenizer,
            world,
            ref_tokens,
            r,
            mask,
            objective,
            max_new_tokens,
            reference_samples,
        )
    return out
