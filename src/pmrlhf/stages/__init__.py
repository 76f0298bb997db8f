"""One module per stage: a Config dataclass and ``run(config) -> path``."""
