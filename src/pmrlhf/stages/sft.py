"""Stage 1: supervised fine-tuning on demonstrations, loss on response tokens only (TRL's SFTTrainer)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig, Seed, require_checkpointing, to_dict
from pmrlhf.data.sources import holdout
from pmrlhf.data.world import WorldConfig
from pmrlhf.io import atomic_write_json, console, progress_bar
from pmrlhf.models import load_causal_lm, load_tokenizer, save_model
from pmrlhf.training import checkpoints
from pmrlhf.training.guards import check_finite, check_weights_finite
from pmrlhf.training.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    tokenizer_source,
    write_objective,
)
from pmrlhf.training.setup import HALF_TYPES, gathered_model, load_precisions, process_state, seed_everything


@dataclass
class SFTConfig:
    """Stage 1 (``pmrlhf sft``)."""

    run_dir: str = "runs/demo"  # the run folder every stage of a pipeline shares
    name: str = "sft"  # sub-folder of this stage's outputs
    seed: Seed = 0  # seed of initialisation, shuffling and dropout
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=lambda: DataConfig(portion="sft"))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, epochs=8, batch_size=32))
    checkpoint_every: int = 100  # optimiser steps between checkpoints to resume from (the Trainer's); 0 writes none
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in <run_dir>/<name>.partial/checkpoints
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        require_checkpointing(self.checkpoint_every, self.keep_checkpoints)


# Written into each of the Trainer's checkpoints once it is complete: the run's config, which resuming checks.
DONE = "pmrlhf-config.json"


def _resume_point(root: Path, config: SFTConfig) -> Path | None:
    """The newest complete Trainer checkpoint under ``root``, checked to belong to this run; None if there is none."""
    done = sorted((p for p in root.glob("checkpoint-*") if (p / DONE).is_file()), key=lambda p: int(p.name[11:]))
    if not done:
        console.print("[yellow]resume: no checkpoint found, starting from the beginning[/yellow]")
        return None
    checkpoints.check_same_run(
        done[-1], json.loads((done[-1] / DONE).read_text()), to_dict(config), checkpoints.MAY_CHANGE
    )
    return done[-1]


def encoded(records, encoder) -> list[dict]:
    """Demonstrations as TRL takes them tokenised: ``input_ids`` (prompt and response, the response ending with
    the end of sequence) and ``completion_mask`` (1 on the response's tokens); prompts the encoder skips are left
    out."""
    rows = []
    for r in records:
        prompt = encoder.prompt(r.prompt)
        if prompt is not None:
            response = encoder.response(r.response)
            rows.append({"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + [1] * len(response)})
    return rows


def run(config: SFTConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model``; return that path."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    main = process_state().is_main_process  # under several processes, every one trains and one writes
    out = stage_dir(config.run_dir, config.name, config, resumable=True)
    root = out / "checkpoints"
    resume_from = _resume_point(root, config) if config.resume else None
    if main and not config.resume:
        checkpoints.move_aside(root, "checkpoint")
    step = int(resume_from.name[11:]) if resume_from else 0
    if resume_from and main:
        console.print(f"resumed {config.name} at step {step} from {resume_from}")
    seed_everything(config.seed)
    records, report = load_stage_records(config.data, "demonstration", config.run_dir, config.world)
    tokenizer = load_tokenizer(tokenizer_source(config.model.name_or_path, config.data, config.run_dir, config.world))
    train, held = holdout(records, config.data.eval_fraction, config.data.split_seed)
    mixed = HALF_TYPES.get(config.model.dtype, "no")  # a half dtype trains float32 weights under autocast
    trainable = load_precisions(config.model, mixed)[0]
    model = load_causal_lm(trainable, tokenizer)
    # Token ids from the encoder every later stage uses, rather than TRL's tokenisation of prompt + response as one
    # text: where tokens merge across the boundary, or a prompt's truncation differs, the SFT model would otherwise
    # learn from other token sequences than PPO and DPO feed it. The loss is on the response tokens alone.
    encoder = stage_encoder(tokenizer, config.data, trainable)
    to_ds = lambda rs: Dataset.from_list(encoded(rs, encoder))  # noqa: E731
    train_ds, held_ds = to_ds(train), to_ds(held)
    require_examples(config.name, len(train_ds), len(records), encoder)
    max_length = encoder.max_prompt_tokens + encoder.max_response_tokens

    log = checkpoints.metrics_log(out, config, step, f"{Path(config.run_dir).name}-sft") if main else None

    progress = progress_bar(not main)

    class ToMetrics(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            progress.start()
            self.task = progress.add_task("SFT", total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            progress.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            progress.stop()

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # the Trainer has written the whole checkpoint by now
                atomic_write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / DONE, to_dict(config))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            # TRL's running token counts, and the Trainer's closing mean loss, cover only the steps since a run last
            # resumed; the per-step losses cover the whole run
            for key in ("num_tokens", "eval_num_tokens", "train_loss"):
                logs.pop(key, None)
            for key, name in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
                if key in logs:  # the mean over the steps since the last log: a NaN in any shows here
                    check_finite(f"SFT: step {state.global_step}", name, logs[key])
            if "eval_loss" in logs:
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50))
            if "loss" in logs:
                logs["train_perplexity"] = math.exp(min(logs["loss"], 50))
                progress.update(self.task, description=f"SFT  loss {logs['loss']:.3f}")
            if log is not None and state.global_step > step:  # a resumed run's log holds the rows up to its step
                log.log(state.global_step, logs)

    # TRL turns activation checkpointing on by default; the model's config decides (transformers 5 renamed it)
    names = {f.name for f in dataclasses.fields(TRLSFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = TRLSFTConfig(
        **{checkpointing: config.model.gradient_checkpointing},
        output_dir=str(root),
        num_train_epochs=config.optim.epochs,
        per_device_train_batch_size=config.optim.batch_size,
        per_device_eval_batch_size=config.optim.batch_size,
        gradient_accumulation_steps=config.optim.grad_accum,
        learning_rate=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        lr_scheduler_type=config.optim.scheduler,
        max_grad_norm=config.optim.max_grad_norm or 0.0,
        logging_steps=config.logging.log_every,
        eval_strategy="epoch" if len(held_ds) else "no",
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=max(config.checkpoint_every, 1),
        save_total_limit=config.keep_checkpoints,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        max_length=max_length,
        completion_only_loss=True,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU-only machine without it
        dataloader_num_workers=0,
        disable_tqdm=True,  # the rich bar below shows progress without printing every log line
    )
    warmup_ratio = config.optim.warmup_ratio

    class WarmupShare(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            # warmup_ratio is a share of the steps, as in every other stage (``optim.lr_schedule``); transformers
            # has only warmup_steps, and reads 1.0 there as one step
            self.args.warmup_steps = math.ceil(warmup_ratio * num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

    trainer = WarmupShare(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=held_ds if len(held_ds) else None,
        processing_class=tokenizer,
        callbacks=[ToMetrics()],
    )
    trainer.remove_callback(PrinterCallback)  # which disable_tqdm puts in the bar's place: a line per log
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as e:
        if resume_from is not None:
            checkpoints.blame(resume_from, e)
        raise
    finally:
        progress.stop()
    check_weights_finite("SFT: after training", trainer.model)  # steps since the last log are not checked yet
    final = trainer.evaluate() if len(held_ds) else {}
    plain = gathered_model(trainer.accelerator, trainer.model, lambda: load_causal_lm(trainable, tokenizer))
    if main:
        log.close()
        path = save_model(plain, tokenizer, out / "model")
        write_objective(out, {"method": "sft", "loss": "negative log-likelihood of the response tokens"})
        summary = {
            "train_examples": len(train_ds),
            "eval_examples": len(held_ds),
            "data": report.summary(),
            "encoding": dict(encoder.counts),
        }
        if final:
            summary |= {"eval_loss": final["eval_loss"], "eval_perplexity": math.exp(min(final["eval_loss"], 50))}
        atomic_write_json(out / "summary.json", summary)
    done = finish_stage(out)
    if main:
        console.print(
            f"[green]SFT model saved to {done / path.name}[/green]"
            + (f"  held-out perplexity {summary['eval_perplexity']:.3f}" if final else "")
        )
    trainer.accelerator.wait_for_everyone()  # the next stage may read what the main process wrote
    return done / "model"
