"""Eager API: swap pruned ``nn.Linear`` modules for :class:`SparseLinear`, for users who
cannot use torch.compile. The result runs eagerly and goes through ``torch.export``
(the ``sparsecpu::`` ops appear in the exported graph)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .passes.packed_cache import tensor_identity


class SparseLinear(nn.Module):
    """A Linear whose forward calls ``sparsecpu::linear`` on a packed copy of its weight.

    The packed buffer is rebuilt before a forward if the weight was edited since packing.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.activation = activation
        self.weight = linear.weight
        self.bias = linear.bias
        # Not persistent: checkpoints stay those of the nn.Linear (weight, bias) and
        # the packed copy is rebuilt from the weight, never loaded stale.
        self.register_buffer("packed", ops.pack_linear(self.weight.detach()), persistent=False)
        self._packed_from = self._weight_identity()

    def _weight_identity(self) -> tuple:
        return tensor_identity(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the op itself runs an edited weight with a buffer packed
        # from it (csrc/ops/packed_weights.h); eagerly the module repacks its own copy.
        if not torch.compiler.is_compiling() and self._weight_identity() != self._packed_from:
            self.packed = ops.pack_linear(self.weight.detach())
            self._packed_from = self._weight_identity()
        return ops.linear(input, self.weight, self.packed, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={ops.packed_info(self.packed).nnz}, activation={self.activation}"
        )


def sparsify(model: nn.Module, *, min_sparsity: float = 0.6) -> nn.Module:
    """Replaces, in place, every float32 ``nn.Linear`` of ``model`` whose weight has at
    least ``min_sparsity`` exact zeros with a :class:`SparseLinear`. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(min_sparsity, (int, float)) or isinstance(min_sparsity, bool):
        raise TypeError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32:
                continue
            weight = child.weight.detach()
            sparsity = 1.0 - torch.count_nonzero(weight).item() / max(weight.numel(), 1)
            if sparsity >= min_sparsity:
                setattr(parent, child_name, SparseLinear(child))
    return model
