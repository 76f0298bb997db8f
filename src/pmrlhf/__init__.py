"""pmrlhf: RLHF that matches the spread of human preferences, not only their majority."""

__version__ = "0.1.0"
