"""Stage 2: the reward model, from comparisons (eq. (2.2)) or K-wise rankings (pairwise or Plackett-Luce).

Our own loop rather than TRL's ``RewardTrainer``: one code path serves K = 2 comparisons, InstructGPT's
K-wise batches (all C(K,2) pairs of a prompt in one batch element, one forward pass per response) and the
listwise loss, which ``RewardTrainer`` does not. Built on ``accelerate``.

Early stopping on held-out pairwise accuracy (the paper stops early against over-optimisation, Sec. 6); the
best model by that accuracy is the one saved.

With ``groups`` > 1 the model has a score head per labeler group and is a mixture of Bradley-Terry models fitted
by EM over the labelers the data names (MaxMin-RLHF's groups): its preference between two answers is
``sum_g share_g sigmoid(r_g(y1) - r_g(y2))``, which no single reward gives, so PPO and evaluation refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pmrlhf.config import DataConfig, InputError, ModelConfig, OptimConfig, require
from pmrlhf.data.records import Comparison, Ranking
from pmrlhf.data.sources import holdout
from pmrlhf.data.tokenize import Encoder, pad
from pmrlhf.data.world import World
from pmrlhf.evaluation.truth import minority_shares
from pmrlhf.io import atomic_write_json, console
from pmrlhf.models import load_reward_model, load_tokenizer, save_model
from pmrlhf.models.scoring import sequence_scores
from pmrlhf.objectives.preference import mixture_btl_em
from pmrlhf.objectives.reward import REWARD_LOSSES, mixture_pairwise_loss, mixture_preference, pair_accuracy
from pmrlhf.stages.base import StageConfig
from pmrlhf.stages.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    tokenizer_source,
    write_objective,
)
from pmrlhf.training.fit import BestModel, Fit, fit
from pmrlhf.training.guards import check_weights_finite
from pmrlhf.training.setup import gathered_model, load_precisions, optim_accelerator, seed_everything


@dataclass
class RewardConfig(StageConfig):
    """Stage 2 (``pmrlhf rm``)."""

    name: str = "reward"  # sub-folder of this stage's outputs
    data: DataConfig = field(default_factory=DataConfig)  # the comparisons or rankings
    data_kind: str = "comparison"  # comparison | ranking: pairs, or K-wise rankings
    loss: str = "pairwise"  # pairwise (eq. (2.2); all C(K,2) pairs for rankings) | listwise (Plackett-Luce, App. A.1)
    model: ModelConfig = field(default_factory=ModelConfig)  # the model the score head sits on
    init_from_sft: bool = True  # start from <run_dir>/sft/model when model.name_or_path is empty and it exists
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, epochs=3, batch_size=32))
    eval_every: int = 50  # optimiser steps between held-out evaluations (and at the end of every epoch)
    patience: int = 4  # evaluations without a better held-out accuracy before stopping; 0 never stops early
    # above 1: a mixture of this many Bradley-Terry models, fitted by EM over the labelers the data names
    groups: int = 1

    def validate(self) -> None:
        require(self.loss in REWARD_LOSSES, f"unknown reward loss {self.loss!r}; use one of {sorted(REWARD_LOSSES)}")
        require(
            self.data_kind in ("comparison", "ranking"), f"data_kind must be comparison or ranking: {self.data_kind!r}"
        )
        require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        require(self.groups >= 1, f"groups must be >= 1, got {self.groups}")
        mixture = self.data_kind == "comparison" and self.loss == "pairwise"
        require(self.groups == 1 or mixture, "groups > 1 fits comparisons (data_kind: comparison, loss: pairwise)")
        require(self.patience >= 0, f"patience must be >= 0 (0 never stops early), got {self.patience}")


def _ordered(records: list[Comparison | Ranking]) -> list[tuple[str, list[str], str | None]]:
    """Each record as (prompt, responses best first, its labeler where the data names one)."""
    return [
        (r.prompt, [r.chosen, r.rejected], r.labeler) if isinstance(r, Comparison) else (r.prompt, r.ordered, None)
        for r in records
    ]


def _encode(items, encoder: Encoder) -> list[tuple[list[int], list[list[int]], str | None]]:
    out = []
    for prompt, responses, labeler in items:
        ids = encoder.prompt(prompt)
        if ids is not None:
            out.append((ids, [encoder.response(r) for r in responses], labeler))
    return out


class LabelerGroups:
    """Incremental EM over latent labeler groups (Neal and Hinton, 1998), the state the loss carries: each
    training comparison's log-likelihood under each group's reward as its batch last scored it, a labeler's
    posterior over the groups from all of its comparisons and the groups' prior, which is the mean posterior.
    Until every comparison has been scored once, the posteriors are the start: the tabular mixture's where the
    comparisons' responses repeat (``tabular_start``), else a random one (seeded)."""

    def __init__(self, train: list, groups: int, seed: int):
        labelers = [labeler for *_, labeler in train]
        self.names = sorted(set(labelers))
        number = {name: i for i, name in enumerate(self.names)}
        self.labeler = torch.tensor([number[name] for name in labelers])
        self.log_lik = torch.zeros(len(labelers), groups, dtype=torch.float64)
        self.seen = torch.zeros(len(labelers), dtype=torch.bool)
        generator = torch.Generator().manual_seed(seed)
        self.start = tabular_start(train, self.labeler, groups, generator)
        self.started = "random" if self.start is None else "tabular"
        if self.start is None:
            e = -torch.log(torch.rand(len(self.names), groups, generator=generator).double())
            self.start = e / e.sum(-1, keepdim=True)
        self.prior = torch.full((groups,), 1.0 / groups).double()

    def posterior(self) -> torch.Tensor:
        """``[labelers, groups]``."""
        if not self.seen.all():
            return self.start
        per_labeler = torch.zeros_like(self.start).index_add_(0, self.labeler, self.log_lik)
        return torch.softmax(per_labeler + torch.log(self.prior), -1)

    def observe(self, index: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        """Take the groups' margins ``[B, G]`` of comparisons ``index``; their posterior weights ``[B, G]``."""
        self.log_lik[index] = F.logsigmoid(margins.detach().double().cpu())
        self.seen[index] = True
        posterior = self.posterior()
        if self.seen.all():
            self.prior = posterior.mean(0)
        return posterior[self.labeler[index]].to(margins)

    def shares(self) -> torch.Tensor:
        """Each group's share of the comparisons."""
        return self.posterior()[self.labeler].mean(0)

    def state(self) -> dict:
        return {"log_lik": self.log_lik, "seen": self.seen, "prior": self.prior}

    def restore(self, state: dict) -> None:
        self.log_lik, self.seen, self.prior = state["log_lik"], state["seen"], state["prior"]

    @torch.no_grad()
    def settle(self, model, train: list, pad_id: int, batch_size: int) -> dict:
        """The E-step for ``model`` as it is saved: every comparison scored by it, the prior iterated to its fixed
        point; the shares and each labeler's posterior, for ``mixture.json``."""
        for s in range(0, len(train), batch_size):
            scores, _ = score_batch(model, train[s : s + batch_size], pad_id)
            self.log_lik[s : s + batch_size] = F.logsigmoid(scores[:, 0] - scores[:, 1]).double().cpu()
        self.seen[:] = True
        for _ in range(200):
            self.prior = self.posterior().mean(0)
        posterior = self.posterior()
        return {
            "start": self.started,
            "shares": self.shares().tolist(),
            "labelers": {name: posterior[i].tolist() for i, name in enumerate(self.names)},
        }


def tabular_start(train: list, labeler: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor | None:
    """Each labeler's posterior ``[L, G]`` under the tabular mixture (``preference.mixture_btl_em``, the best of
    its random starts) of the comparisons' distinct responses, where each response recurs in at least four
    comparisons on average, as a synthetic world's do; None where they do not (a table of one comparison per
    response says nothing of its labeler). The network's EM from one random start can settle on a split that is
    not the groups, where the tabular fit takes the best of several starts (docs/study.md, point 7)."""
    prompts: dict[tuple, int] = {}
    responses: list[dict[tuple, int]] = []
    prompt, winner, loser = [], [], []
    for ids, (chosen, rejected), _ in train:
        p = prompts.setdefault(tuple(ids), len(prompts))
        if p == len(responses):
            responses.append({})
        prompt.append(p)
        winner.append(responses[p].setdefault(tuple(chosen), len(responses[p])))
        loser.append(responses[p].setdefault(tuple(rejected), len(responses[p])))
    if 4 * sum(map(len, responses)) > 2 * len(train):
        return None
    mask = torch.zeros(len(responses), max(map(len, responses)), dtype=torch.bool)
    for p, seen in enumerate(responses):
        mask[p, : len(seen)] = True
    index = [torch.tensor(v) for v in (prompt, winner, loser)]
    return mixture_btl_em(*index, labeler, mask, groups=groups, generator=generator)[2]


def score_batch(model, batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over every response of every element: ``(scores [N, K], mask [N, K])``."""
    K = max(len(rs) for _, rs, _ in batch)
    seqs, slots = [], []
    for n, (p, rs, _) in enumerate(batch):
        for k, r in enumerate(rs):
            seqs.append(p + r)
            slots.append((n, k))
    ids, attn = pad(seqs, pad_id, "right")
    device = next(model.parameters()).device
    flat = sequence_scores(model, ids.to(device), attn.to(device))  # [n], or [n, G] for a mixture's groups
    scores = torch.zeros(len(batch), K, *flat.shape[1:], device=device)
    mask = torch.zeros(len(batch), K, dtype=torch.bool, device=device)
    n_idx = torch.tensor([s[0] for s in slots], device=device)
    k_idx = torch.tensor([s[1] for s in slots], device=device)
    scores = scores.index_put((n_idx, k_idx), flat)
    mask[n_idx, k_idx] = True
    return scores, mask


@torch.no_grad()
def evaluate(model, data, pad_id: int, batch_size: int, shares: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out pairwise accuracy and mean margin; for a mixture (``shares``), of its preference
    ``sum_g share_g sigmoid(margin_g)``, the labeler unknown."""
    model.eval()
    correct = margin = pairs = 0.0
    for s in range(0, len(data), batch_size):
        scores, mask = score_batch(model, data[s : s + batch_size], pad_id)
        if shares is None:
            acc, mar = pair_accuracy(scores, mask)
        else:
            p = mixture_preference(scores[:, 0] - scores[:, 1], shares.to(scores))
            acc, mar = (p > 0.5).float().mean(), torch.logit(p).mean()
        n = sum(len(rs) * (len(rs) - 1) / 2 for _, rs, _ in data[s : s + batch_size])
        correct, margin, pairs = correct + acc.item() * n, margin + mar.item() * n, pairs + n
    model.train()
    return {"eval/accuracy": correct / max(pairs, 1), "eval/margin": margin / max(pairs, 1)}


def read_where_transformers_reads(model, tokenizer) -> str:
    """Make plain transformers read the saved reward model's score at the token pmrlhf reads, the response's end of
    sequence; say where it reads it. transformers reads the last token that is not the config's pad token, so
    where the pad token is the end of sequence (SmolLM2, Llama-3, GPT-2) it read the token before. The saved
    config then names another token that never ends a text as the pad token (the tokenizer's unknown or
    beginning-of-sequence token; pmrlhf itself reads by the attention mask), and the saved tokenizer pads with it.
    A tokenizer with no such token (GPT-2's one special token is all three) leaves transformers a token short."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return "the end of sequence"
    spare = [t for t in (tokenizer.unk_token, tokenizer.bos_token) if t and t != tokenizer.eos_token]
    if not spare:
        console.print(
            "[yellow]reward: the tokenizer's one special token pads and ends sequences, so plain transformers reads "
            "this model's score one token before pmrlhf does; score with pmrlhf or give the tokenizer a pad token"
            "[/yellow]"
        )
        return "the token before the end of sequence (no spare special token to pad with)"
    tokenizer.pad_token = spare[0]
    model.config.pad_token_id = tokenizer.pad_token_id  # a LoRA model's config is its base model's
    return f"the end of sequence (pad token {spare[0]!r})"


def _labeler_groups(config: RewardConfig, train: list, held: list, processes: int) -> LabelerGroups | None:
    """The EM state of a mixture (``groups`` > 1), over the labelers the training comparisons name."""
    if config.groups == 1:
        return None
    unnamed = sum(labeler is None for *_, labeler in train + held)
    if unnamed:
        raise InputError(
            f"groups: {config.groups} fits labeler groups by EM over the labelers the data names, and {unnamed} of "
            f"the comparisons of {config.data.source} name none: give each row a labeler (a labeler column, or "
            "data.columns.labeler: the column that names them)"
        )
    if processes > 1:
        raise InputError(f"groups: {config.groups} trains on one process: EM keeps every comparison's state in one")
    return LabelerGroups(train, config.groups, config.seed)


def run(config: RewardConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model`` (the best by held-out accuracy); return that path."""
    config.validate()
    seed_everything(config.seed)
    accelerator = optim_accelerator(config.model, config.optim)
    main = accelerator.is_main_process  # every process trains on its share of each batch; one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    records, report = load_stage_records(config.data, config.data_kind, config.run_dir, config.world)
    sft = Path(config.run_dir) / "sft" / "model"
    init = "" if config.model.name_or_path else (str(sft) if config.init_from_sft and sft.is_dir() else "")
    tokenizer = load_tokenizer(
        init or tokenizer_source(config.model.name_or_path, config.data, config.run_dir, config.world)
    )
    encoder = stage_encoder(tokenizer, config.data, config.model, init or None)
    train_items, held_items = holdout(_ordered(records), config.data.eval_fraction, config.data.split_seed)
    train, held = _encode(train_items, encoder), _encode(held_items, encoder)
    require_examples("reward", len(train), len(records), encoder)
    groups = _labeler_groups(config, train, held, accelerator.num_processes)
    if groups is not None:  # a comparison is known by its place in train, where the EM state keeps its numbers
        train = [(ids, responses, i) for i, (ids, responses, _) in enumerate(train)]
    trainable, _ = load_precisions(config.model, accelerator.mixed_precision)
    model = load_reward_model(trainable, tokenizer, path=init or None, groups=config.groups)
    loss_fn, pad_id, batch_size = REWARD_LOSSES[config.loss], tokenizer.pad_token_id, config.optim.batch_size

    def batch_loss(model, share):
        scores, mask = score_batch(model, share, pad_id)
        if groups is None:
            return loss_fn(scores, mask), {}
        margins = scores[:, 0] - scores[:, 1]
        return mixture_pairwise_loss(margins, groups.observe(torch.tensor([i for *_, i in share]), margins)), {}

    spec = Fit(
        name=config.name,
        batch_loss=batch_loss,
        evaluate=(
            (lambda model: evaluate(model, held, pad_id, batch_size, groups and groups.shares())) if held else None
        ),
        eval_due=lambda step, end_of_epoch, last: step % config.eval_every == 0 or end_of_epoch or last,
        best=BestModel("eval/accuracy", config.patience),
        carried=groups,
    )
    fitted = fit(accelerator, model, train, config, out, spec)
    spec.best.load_into(fitted.model, accelerator)  # each process its own part, where parameters are sharded
    check_weights_finite(f"{config.name}: the model to save", fitted.model)  # the last steps' were never checked
    final = gathered_model(
        accelerator,
        fitted.model,
        lambda: load_reward_model(trainable, tokenizer, path=init or None, groups=config.groups),
    )
    mixture = groups.settle(fitted.model, train, pad_id, batch_size) if groups is not None else None
    if main:
        summary = {
            "steps": fitted.steps,
            "stopped_early": fitted.stopped_early,
            "best": spec.best.best,
            "train_examples": len(train),
            "eval_examples": len(held),
            "data": report.summary(),
            "encoding": dict(encoder.counts),
        }
        summary["read_by_transformers_at"] = read_where_transformers_reads(final, tokenizer)
        if mixture is not None:
            summary["group_shares"] = mixture["shares"]
            atomic_write_json(out / "mixture.json", mixture)
        world = Path(config.run_dir) / "world"
        if config.data.source == "world" and any(p.minority for p in World.load(world).prompts):
            shares = mixture and mixture["shares"]
            summary["minority_share"] = minority_shares(final.to(accelerator.device), tokenizer, world, shares)
        save_model(final, tokenizer, out / "model")
        write_objective(out, {"method": "reward", "loss": config.loss, "data_kind": config.data_kind})
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(
            f"[green]reward model saved to {done / 'model'}[/green]  held-out accuracy "
            f"{spec.best.best['eval/accuracy']:.3f}"
            + (f"  groups' shares {', '.join(f'{x:.3f}' for x in mixture['shares'])}" if mixture else "")
        )
        if "minority_share" in summary:
            kept = summary["minority_share"]
            console.print(
                f"the minority's answers over M(x): {kept['reward_model']:.3f} under this model, "
                f"{kept['truth']:.3f} in truth, {kept['learnable']:.3f} for one BTL model with unlimited labels"
            )
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
