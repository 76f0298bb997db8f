"""An exponential moving average of a model's weights, kept beside the model while it trains."""

from __future__ import annotations

import torch


class EMA:
    """``ema = decay * ema + (1 - decay) * weight`` after every update, of this process's part of each weight
    (FSDP shards it), in float32 whatever the weights' type: a bf16 average would round away updates of
    ``(1 - decay)`` of a weight (DeepSpeed's bf16 engine holds bf16 weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.weights = {k: _float32(_local(v).detach()) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                self.weights[k].mul_(self.decay).add_(_local(v).detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's weights with their average (for saving it, at the end of training)."""
        for k, v in self.model.state_dict().items():
            _local(v).copy_(self.weights[k])

    def load(self, weights: dict[str, torch.Tensor], device) -> None:
        self.weights = {k: v.to(device) for k, v in weights.items()}


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a floating-point tensor; a copy of any other as it is."""
    return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight: the local shard of FSDP's DTensor, the weight itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
