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


def minority_shares(reward_model, tokenizer, world_path, shares: list[float] | None = None) -> dict[str, float]:
    """What a reward model keeps of the minority's answers in a world of groups: the share of M(x) that its
    Plackett-Luce distribution (a mixture's, with ``shares``: ``sum_g share_g softmax(r_g)``) gives the answers a
    minority prefers, beside the truth's and the learnable target's (one BTL model, unlimited labels)."""
    from pmrlhf.evaluation.exact import rewards_over_m
    from pmrlhf.evaluation.study import minority_share
    from pmrlhf.objectives.preference import mixture_distribution

    world = World.load(world_path)
    scores, mask = rewards_over_m(reward_model, tokenizer, world)
    scores = scores.movedim(-1, 0) if scores.dim() == 3 else scores[None]  # [G, P, k]
    dist = mixture_distribution(scores, torch.tensor(shares or [1.0], dtype=torch.float64), mask)
    truth = truth_over_m(world)
    return {
        "reward_model": minority_share(dist.tolist(), world),
        "truth": minority_share(truth["truth"].tolist(), world),
        "learnable": minority_share(truth["learnable"].tolist(), world),
    }


def labelled_comparisons(world: World, n: int, labelers: list[int], generator: torch.Generator) -> dict:
    """``n`` comparisons drawn as ``World.comparisons`` draws them, each made by a known labeler: ``labelers[g]``
    labelers in group ``g`` of the world's groups, one of them drawn uniformly once the comparison's group is drawn
    by its share. Index tensors ``prompt, winner, loser, labeler, group`` (indices into M(x) for the answers), and
    the ``mask`` of M(x); what a dataset that names its labelers would hold, where the world's files name none."""
    truth = truth_over_m(world)
    mask = truth["mask"]
    groups = [p.groups for p in world.prompts]
    shares = torch.tensor([share for share, _ in groups[0]], dtype=torch.float64)
    rewards = torch.zeros(len(shares), *mask.shape, dtype=torch.float64)
    for i, prompt_groups in enumerate(groups):
        for g, (_, reward) in enumerate(prompt_groups):
            rewards[g, i, : len(reward)] = torch.tensor(reward, dtype=torch.float64)
    prompt = torch.randint(mask.shape[0], (n,), generator=generator)
    pair = torch.multinomial(truth["pair_weights"][prompt].flatten(1), 1, generator=generator)[:, 0]
    a, b = pair // mask.shape[1], pair % mask.shape[1]
    group = torch.multinomial(shares, n, replacement=True, generator=generator)
    first = torch.tensor([0, *labelers[:-1]]).cumsum(0)
    labeler = first[group] + (torch.rand(n, generator=generator) * torch.tensor(labelers)[group]).long()
    a_wins = torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(
        rewards[group, prompt, a] - rewards[group, prompt, b]
    )
    winner, loser = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    return {"prompt": prompt, "winner": winner, "loser": loser, "labeler": labeler, "group": group, "mask": mask}


def mixture_recovery(seeds=range(5), sizes=(3000, 30000), labelers=(20, 2)) -> str:
    """docs/study.md's table of what a mixture of BTL models fitted by EM (``preference.mixture_btl_em``) keeps of
    the minority's answers in the text world, against one BTL model and the truth: over world ``seeds``, at each
    number of comparisons in ``sizes``, mean difference from the truth with its 95 % half-width, and the groups EM
    found. ``python -c "from pmrlhf.evaluation.truth import mixture_recovery as m; print(m())"``."""
    from pmrlhf.data.world import WorldConfig
    from pmrlhf.evaluation.study import Interval, minority_share
    from pmrlhf.objectives.preference import btl_fit_of_counts, mixture_btl_em, mixture_distribution

    def share_of(rewards, shares, mask, world) -> float:
        return minority_share(mixture_distribution(rewards, shares, mask).tolist(), world)

    rows: dict[str, dict[int, list[float]]] = {}
    found: dict[int, list[str]] = {n: [] for n in sizes}
    for seed in seeds:
        world = World.generate(WorldConfig(kind="text", n_prompts=12, seed=seed))
        truth = truth_over_m(world)
        true_share = minority_share(truth["truth"].tolist(), world)
        for n in sizes:
            g = torch.Generator().manual_seed(seed)
            d = labelled_comparisons(world, n, list(labelers), g)
            fit = dict(prompt=d["prompt"], winner=d["winner"], loser=d["loser"], mask=d["mask"], generator=g)
            shares, rewards, posterior = mixture_btl_em(labeler=d["labeler"], **fit)
            unnamed, unnamed_rewards, _ = mixture_btl_em(labeler=torch.arange(n), **fit)
            counts = torch.zeros(*d["mask"].shape, d["mask"].shape[1], dtype=torch.float64)
            counts.index_put_((d["prompt"], d["winner"], d["loser"]), torch.ones(n).double(), accumulate=True)
            single = btl_fit_of_counts(counts, d["mask"])
            one = torch.ones(1, dtype=torch.float64)
            for name, share in (
                ("mixture by EM, labelers named", share_of(rewards, shares, d["mask"], world)),
                ("one BTL model on the same labels", share_of(single[None], one, d["mask"], world)),
                ("one BTL model, unlimited labels", minority_share(truth["learnable"].tolist(), world)),
                ("mixture by EM, labelers not named", share_of(unnamed_rewards, unnamed, d["mask"], world)),
            ):
                rows.setdefault(name, {}).setdefault(n, []).append(share - true_share)
            groups = posterior.argmax(-1)
            right = bool(((groups == groups[0]) == (torch.arange(sum(labelers)) < labelers[0])).all())
            found[n].append(
                f"{'all' if right else 'not all'} labelers placed, minority {shares.min():.3f}, "
                f"unnamed smaller group {unnamed.min():.3f}"
            )
    head = "| minority's answers, minus the truth | " + " | ".join(f"{n:,} comparisons" for n in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for name, by_size in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{Interval.of(by_size[n])}" for n in sizes) + " |")
    return "\n".join(lines + [f"{n:,}: " + "; ".join(found[n]) for n in sizes])
