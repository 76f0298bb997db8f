"""``pmrlhf dpo``: DPO, conservative DPO, robust DPO, IPO, SimPO, and preference-matching DPO (plain and
conditional), on comparisons.

Our own loop rather than TRL's ``DPOTrainer``: one loop serves all seven losses, three of which (SimPO and
the two PM variants) ``DPOTrainer`` does not have; where it has the same variant (``sigmoid``, ``ipo``,
``robust``) the first-step loss matches it (``tests/test_dpo_stage.py``). Reference log-probabilities are
computed once, before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, ModelConfig, OptimConfig, require
from pmrlhf.data.sources import holdout
from pmrlhf.io import atomic_write_json, console
from pmrlhf.models import WithoutAdapter, load_causal_lm, load_tokenizer, save_model
from pmrlhf.models.scoring import join, sequence_logprobs, token_logprobs
from pmrlhf.objectives import dpo
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
from pmrlhf.training.fit import Fit, fit
from pmrlhf.training.guards import check_weights_finite
from pmrlhf.training.setup import gathered_model, load_precisions, optim_accelerator, seed_everything


@dataclass
class DPOConfig(StageConfig):
    """``pmrlhf dpo``."""

    name: str = "dpo"  # sub-folder of this stage's outputs
    data: DataConfig = field(default_factory=DataConfig)  # the comparisons
    model: ModelConfig = field(default_factory=ModelConfig)  # policy and reference; "" = <run_dir>/sft/model
    loss: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing) | robust | ipo | simpo | pm | cpm
    beta: float = 0.1  # DPO's beta (the inverse temperature of the implicit reward)
    label_smoothing: float = 0.0  # cDPO's eps (sigmoid) or robust DPO's flip rate
    simpo_gamma: float = 1.0  # SimPO's target margin
    alpha: float = 0.1  # conditional PM-DPO: responses with pi_ref(y|x) >= alpha get the PM form
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, epochs=2, batch_size=32))

    def validate(self) -> None:
        require(self.loss in dpo.DPO_LOSSES, f"unknown DPO loss {self.loss!r}; known: {sorted(dpo.DPO_LOSSES)}")
        require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        if "alpha" in dpo.DPO_LOSSES[self.loss].hyperparameters:
            require(
                0 < self.alpha <= 1,
                f"alpha must be in (0, 1] (the reference probability above which PM applies), got {self.alpha}",
            )
        if self.loss in ("sigmoid", "robust"):
            require(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def loss_fn(config: DPOConfig):
    """``f(pairs) -> ([N] losses, stats)``: the config's loss with its hyper-parameters, and the statistics of its
    own implicit reward: how often it ranks the chosen response first, its mean margin, and its mean values."""
    loss = dpo.DPO_LOSSES[config.loss]
    hyper = {k: getattr(config, k) for k in loss.hyperparameters}

    def f(pairs: dpo.Pairs):
        with torch.no_grad():
            chosen, rejected = loss.implicit_reward(pairs, **hyper)
            stats = {
                "accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item(),
                "rewards/chosen": chosen.mean().item(),
                "rewards/rejected": rejected.mean().item(),
            }
        return loss.fn(pairs, **hyper), stats

    return f


def batch_logprobs(model, pairs: list[tuple], pad_id: int):
    """Sequence log-probabilities and lengths of chosen and rejected, in one forward pass: ``4 x [N]``.

    ``pairs``: items whose first three fields are prompt, chosen and rejected token ids."""
    prompts = [x[0] for x in pairs] * 2
    responses = [x[1] for x in pairs] + [x[2] for x in pairs]
    device = next(model.parameters()).device
    ids, attn, resp = (t.to(device) for t in join(prompts, responses, pad_id))
    logp = token_logprobs(model, ids, attn, keep=resp).sum(-1)
    length = resp.sum(-1).float()
    n = len(pairs)
    return logp[:n], logp[n:], length[:n], length[n:]


def _reference_logprobs(reference, pairs: list[tuple], pad_id: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi_ref`` of every pair's chosen and rejected response, ``2 x [N]``, on every process. Each process
    scores every n-th pair and the shares are gathered: the frozen model is each process's own copy, so the
    processes may run different numbers of forward passes."""
    from accelerate.utils import gather_object

    n, rank = accelerator.num_processes, accelerator.process_index
    share = pairs[rank::n]
    prompts = [p for p, _, _ in share]
    chosen, _ = sequence_logprobs(reference, prompts, [c for _, c, _ in share], pad_id)
    rejected, _ = sequence_logprobs(reference, prompts, [r for _, _, r in share], pad_id)
    ref_c, ref_r = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for p, (c, r) in enumerate(gather_object([(chosen.tolist(), rejected.tolist())])):
        ref_c[p::n], ref_r[p::n] = torch.tensor(c), torch.tensor(r)
    return ref_c, ref_r


def run(config: DPOConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model``; return that path."""
    config.validate()
    seed_everything(config.seed)
    accelerator = optim_accelerator(config.model, config.optim)
    main = accelerator.is_main_process  # every process trains on its share of each batch; one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    trainable, frozen = load_precisions(config.model, accelerator.mixed_precision)
    sft = Path(config.run_dir) / "sft" / "model"
    init = config.model.name_or_path or (str(sft) if sft.is_dir() else "")
    records, report = load_stage_records(config.data, "comparison", config.run_dir, config.world)
    tokenizer = load_tokenizer(init or tokenizer_source("", config.data, config.run_dir, config.world))
    enc = stage_encoder(tokenizer, config.data, config.model, init or None)
    pairs = []
    for r in records:
        p = enc.prompt(r.prompt)
        if p is not None:
            pairs.append((p, enc.response(r.chosen), enc.response(r.rejected)))
    policy = load_causal_lm(trainable, tokenizer, path=init or None)
    pad_id = tokenizer.pad_token_id
    if dpo.DPO_LOSSES[config.loss].needs_reference:
        if config.model.lora_r:  # the policy's base with its adapter off: no second copy of the weights
            reference = WithoutAdapter(policy.to(accelerator.device))
        else:
            reference = load_causal_lm(frozen, tokenizer, path=init or None, trainable=False).to(accelerator.device)
        ref_c, ref_r = _reference_logprobs(reference, pairs, pad_id, accelerator)
        del reference
    else:
        ref_c = ref_r = torch.zeros(len(pairs))
    # (prompt, chosen, rejected, reference log pi(chosen), reference log pi(rejected))
    items = [(*x, ref_c[i].item(), ref_r[i].item()) for i, x in enumerate(pairs)]
    train, held = holdout(items, config.data.eval_fraction, config.data.split_seed)
    require_examples(config.name, len(train), len(records), enc)
    f = loss_fn(config)

    def batch_loss(model, batch):
        c, r, lc, lr = batch_logprobs(model, batch, pad_id)
        rc = torch.tensor([x[3] for x in batch], device=c.device)
        rr = torch.tensor([x[4] for x in batch], device=c.device)
        losses, stats = f(dpo.Pairs(c, r, rc, rr, lc, lr))
        return losses.mean(), stats

    def evaluate(model):
        with torch.no_grad():
            loss, stats = batch_loss(model, held)
        return {"eval/loss": loss.item(), **{f"eval/{k}": v for k, v in stats.items()}}

    spec = Fit(
        name=config.name,
        batch_loss=batch_loss,
        evaluate=evaluate if held else None,
        eval_due=lambda step, end_of_epoch, last: step % config.logging.log_every == 0 or last,
    )
    fitted = fit(accelerator, policy, train, config, out, spec)
    check_weights_finite(f"{config.name}: the model to save", fitted.model)  # the last steps' were never checked
    final = gathered_model(accelerator, fitted.model, lambda: load_causal_lm(trainable, tokenizer, path=init or None))
    if main:
        path = save_model(final, tokenizer, out / "model")
        # Read by `pmrlhf eval`: the loss's implicit target has the form of the PPO closed forms with coef = beta.
        objective = {
            "method": "dpo",
            "loss": config.loss,
            "beta": config.beta,
            "alpha": config.alpha if "alpha" in dpo.DPO_LOSSES[config.loss].hyperparameters else None,
            "label_smoothing": config.label_smoothing if config.loss in ("sigmoid", "robust") else 0.0,
            "simpo_gamma": config.simpo_gamma if config.loss == "simpo" else None,
        }
        write_objective(out, objective)
        summary = {"steps": fitted.steps, "train_examples": len(train), "data": report.summary()}
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(f"[green]{config.name} saved to {done / path.name}[/green]")
    accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
