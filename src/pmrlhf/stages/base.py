"""What the config of every training stage (``pmrlhf sft``, ``rm``, ``dpo``, ``ppo``) shares, declared once: where
it writes, its seed, its data, its checkpoints and its log. A stage's own config adds what it trains and how, and
gives these its own defaults where they differ (its name, its portion of the data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pmrlhf.config import DataConfig, LoggingConfig, Seed, require
from pmrlhf.data.world import WorldConfig


@dataclass
class StageConfig:
    """The settings every training stage has."""

    run_dir: str = "runs/demo"  # the run folder every stage of a pipeline shares
    name: str = "stage"  # sub-folder of this stage's outputs
    seed: Seed = 0  # seed of everything random in the stage: initialisation, order of examples, sampling
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=DataConfig)  # where its records come from, and how they are cut
    checkpoint_every: int = 100  # optimiser steps between checkpoints to resume from; 0 writes none
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in <run_dir>/<name>.partial/checkpoints
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # where metrics go besides metrics.jsonl

    def __post_init__(self) -> None:
        every, keep = self.checkpoint_every, self.keep_checkpoints  # keeping none deleted each one as it was written
        require(every >= 0, f"checkpoint_every must be >= 0 (0 writes none), got {every}")
        require(keep >= 1, f"keep_checkpoints must be >= 1 (the newest ones kept), got {keep}")
