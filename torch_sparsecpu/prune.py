"""Magnitude pruning, for demos, tests and benchmarks (not a training recipe)."""

from __future__ import annotations

import torch
from torch import nn


def magnitude_prune_(
    module: nn.Module,
    sparsity: float,
    *,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    name_filter=None,
) -> nn.Module:
    """Zeros the ``sparsity`` fraction of smallest-magnitude weights of every layer of
    ``layer_types`` in ``module`` (each layer pruned on its own), in place.

    ``name_filter(name) -> bool`` restricts which layers are pruned. Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if name_filter is not None and not callable(name_filter):
        raise TypeError(f"name_filter must be callable, got {type(name_filter).__name__}")
    with torch.no_grad():
        for name, layer in module.named_modules():
            if not isinstance(layer, layer_types) or (name_filter and not name_filter(name)):
                continue
            weight = layer.weight
            prune_count = int(round(sparsity * weight.numel()))
            if prune_count == 0:
                continue
            order = weight.abs().flatten().argsort()
            weight.view(-1)[order[:prune_count]] = 0.0
    return module
