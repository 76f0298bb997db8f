"""Records, sources, converters, the paper's 20/40/40 split and the synthetic preference world."""

from pmrlhf.data.records import Comparison, Demonstration, Prompt, Ranking, Record
from pmrlhf.data.sources import DataError, LoadReport, holdout, load_records, split_indices
from pmrlhf.data.world import World, WorldConfig, ensure_world

__all__ = [
    "Comparison",
    "DataError",
    "Demonstration",
    "LoadReport",
    "Prompt",
    "Ranking",
    "Record",
    "World",
    "WorldConfig",
    "ensure_world",
    "holdout",
    "load_records",
    "split_indices",
]
