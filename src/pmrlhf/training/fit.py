"""One training loop for the stages that fit a model to a fixed set of examples (SFT, the reward model, the DPO family):
seeded epochs of global batches, each process training on its share, gradient accumulation, the schedule,
held-out evaluation, the best model kept, progress, the metrics log, and checkpoints it resumes from exactly.

A stage says what is particular to it in a ``Fit``: the loss of a batch, what to evaluate and when; the loop
does the rest the same way for every stage.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmrlhf.io import console, progress_bar
from pmrlhf.training import checkpoints
from pmrlhf.training.optim import adamw, epoch_batches, optimizer_step, process_share, stage_schedule


class BestModel:
    """The model's weights where its held-out ``metric`` was highest so far (each process its own part where
    parameters are sharded). After ``patience`` evaluations without a higher one, training stops; 0 never stops."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best: dict[str, float] = {metric: -1.0}
        self.weights: dict | None = None
        self.stale = 0

    def observe(self, metrics: dict[str, float], step: int, model, accelerator) -> bool:
        """Keep the model if ``metrics`` are its best; whether training should stop."""
        if metrics[self.metric] > self.best[self.metric]:
            self.best, self.stale = {**metrics, "step": step}, 0
            self.weights = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
            return False
        self.stale += 1
        return self.patience > 0 and self.stale >= self.patience

    def load_into(self, model, accelerator) -> None:
        if self.weights is not None:
            accelerator.unwrap_model(model).load_state_dict(self.weights)

    def state(self) -> tuple[dict, dict | None]:
        """(what the main process saves, what each process saves) in a checkpoint."""
        shared = {"best": self.best, "stale": self.stale, "has_best": self.weights is not None}
        return shared, ({"best": self.weights} if self.weights is not None else None)

    def restore(self, state: dict, path: Path, accelerator) -> None:
        self.best, self.stale = state["best"], state["stale"]
        self.weights = checkpoints.per_process(path, "best", accelerator) if state["has_best"] else None


@dataclass
class Fit:
    """What a stage hands ``fit``."""

    name: str  # the stage's name, in messages and on the progress bar
    # (prepared model, this process's share of a batch) -> (mean loss over the share, statistics to log)
    batch_loss: Callable[[Any, list], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Any], dict[str, float]] | None = None  # (prepared model) -> held-out metrics
    # (optimiser step, whether it ends an epoch, whether it is the last) -> whether to evaluate after it
    eval_due: Callable[[int, bool, bool], bool] = lambda step, end_of_epoch, last: last
    best: BestModel | None = None  # keep the best model by a held-out metric, and stop early
    # state the stage's loss carries from batch to batch (``state() -> dict``, ``restore(dict)``), checkpointed
    carried: Any = None


@dataclass
class Fitted:
    model: Any  # the prepared model, as training left it (``Fit.best`` holds the best one)
    steps: int  # optimiser steps taken, over every run that resumed
    stopped_early: bool


def fit(accelerator, model, train: list, config, out: Path, spec: Fit) -> Fitted:
    """Train ``model`` on ``train`` by ``config.optim`` (``config.optim.epochs`` passes) in ``out``, resuming from
    its newest checkpoint where ``config.resume`` is set. ``config`` also gives the seed of the order, the
    checkpoints (``checkpoint_every``, ``keep_checkpoints``) and the log (``logging``)."""
    optim, main = config.optim, accelerator.is_main_process
    optimizer = adamw(model.parameters(), accelerator, optim.lr, optim.weight_decay)
    total, scheduler = stage_schedule(optimizer, optim, len(train), accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)

    rng = random.Random(config.seed)
    step, start_batch, stopped, window = 0, 0, False, None  # start_batch: where in its epoch a resumed run picks up
    found, log = checkpoints.begin(accelerator, out, config, "step", checkpoints.MAY_CHANGE)
    if found:
        state, path = found
        step, start_batch = checkpoints.resume_loop(state, rng, scheduler)
        if spec.best is not None:
            spec.best.restore(state, path, accelerator)
        if spec.carried is not None:
            spec.carried.restore(state["carried"])
        console.print(f"resumed {spec.name} at step {step} from {path}")
    with progress_bar(not main) as progress:
        task = progress.add_task(spec.name, total=total, completed=step)
        while step < total and not stopped:
            epoch_rng = rng.getstate()  # a checkpoint replays this epoch's order from here
            batches = epoch_batches(len(train), optim.batch_size, rng, accelerator.num_processes)
            for b, indices in enumerate(batches):
                if b < start_batch:
                    continue
                share, weight = process_share([train[i] for i in indices], accelerator)
                with accelerator.accumulate(model):
                    loss, stats = spec.batch_loss(model, share)
                    where = f"{spec.name}: step {step + 1}"
                    optimizer_step(accelerator, model, optimizer, loss * weight, optim.max_grad_norm, where)
                local = torch.tensor([loss.item(), *stats.values()], device=accelerator.device)
                batch = accelerator.reduce(local * weight, "mean") / optim.grad_accum  # the whole batch's
                window = batch if window is None else window + batch
                if not accelerator.sync_gradients:  # within an accumulation window: no optimiser step yet
                    continue
                means, window = window.tolist(), None
                row = {"train/loss": means[0], **{f"train/{k}": v for k, v in zip(stats, means[1:], strict=True)}}
                row["train/lr"] = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                progress.update(task, advance=1, description=f"{spec.name}  loss {means[0]:.4f}")
                end_of_epoch = b >= len(batches) - optim.grad_accum  # the epoch's last optimiser step
                evaluated = spec.evaluate is not None and spec.eval_due(step, end_of_epoch, step >= total)
                if evaluated:
                    metrics = spec.evaluate(model)
                    row |= metrics
                    if spec.best is not None:
                        stopped = spec.best.observe(metrics, step, model, accelerator)
                last = step >= total or stopped  # the end is saved as the model, not as a checkpoint
                if log is not None and (step % config.logging.log_every == 0 or evaluated or last):
                    log.log(step, row)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and not last:
                    _save(accelerator, out, config, step, epoch_rng, b + 1, scheduler, spec)
                if last:
                    break
            start_batch = 0
    if log is not None:
        log.close()
    accelerator.wait_for_everyone()
    return Fitted(model, step, stopped)


def _save(accelerator, out: Path, config, step: int, epoch_rng, batch: int, scheduler, spec: Fit):
    extra, per_process = spec.best.state() if spec.best is not None else ({}, None)
    if spec.carried is not None:
        extra["carried"] = spec.carried.state()
    state = checkpoints.loop_state(config, step, epoch_rng, batch, scheduler, **extra)
    root = out / "checkpoints"
    checkpoints.save(accelerator, root, f"step-{step:06d}", state, config.keep_checkpoints, per_process)
