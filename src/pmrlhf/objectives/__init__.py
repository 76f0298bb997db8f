"""The paper's mathematics as pure functions: torch tensors in, tensors out.

No model, file or config object enters this package; see ``optimal``, ``preference``, ``penalties`` and
``rl``.
"""

from pmrlhf.objectives import optimal, penalties, preference, rl

__all__ = ["optimal", "penalties", "preference", "rl"]
