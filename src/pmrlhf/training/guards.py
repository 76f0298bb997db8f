"""Stop a run at the first non-finite number, before it reaches the weights or a saved model.

A NaN or inf loss, gradient, reward or advantage trains every weight it touches into NaN within a step, and a
run that goes on saves that model and exits 0. Each check names the stage, the step, the quantity and its
likely cause; the run stops before the optimiser step that would have written it into the weights, so the
checkpoints already written are the last good state and no bad model is saved.
"""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A quantity of a training step that is NaN or infinite."""


LR_CAUSE = "a learning rate too high for this model (lower it) or non-finite inputs"


def check_finite(where: str, name: str, value: torch.Tensor | float, cause: str = LR_CAUSE) -> None:
    """Raise ``NonFiniteError`` if any entry of ``value`` is NaN or infinite."""
    t = torch.as_tensor(value).detach()
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    what = f"{t.item()}" if t.numel() == 1 else f"{bad} of {t.numel()} values"
    raise NonFiniteError(
        f"{where}: {name} is not finite ({what}); likely cause: {cause}. Stopped before it reached the weights: "
        "checkpoints already written are kept, and no model was saved"
    )


def check_weights_finite(where: str, model) -> None:
    """Raise ``NonFiniteError`` if any floating-point weight of ``model`` is NaN or infinite."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p  # this process's shard under FSDP
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            raise NonFiniteError(f"{where}: weight {name} is not finite; likely cause: {LR_CAUSE}. No model was saved")
