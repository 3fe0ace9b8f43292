"""Magnitude pruning, for demos, tests and benchmarks (not a training recipe)."""

from __future__ import annotations

import torch
from torch import nn

from .ops import TALL_BLOCK_ROWS, WIDE_BLOCK_COLS


def magnitude_prune_(
    module: nn.Module,
    sparsity: float,
    *,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    name_filter=None,
    block_rows: int = 1,
    block_cols: int = 1,
) -> nn.Module:
    """Zeros the ``sparsity`` fraction of smallest-magnitude weights of every layer of
    ``layer_types`` in ``module`` (each layer pruned on its own), in place.

    ``name_filter(name) -> bool`` restricts which layers are pruned. ``block_rows=4``
    prunes 4 x 1 blocks (4 consecutive output rows of one input feature) by their L2
    norm instead of single weights: the packed kernels load each activation once for
    a whole block (``ops.default_block_rows``). Layers whose output count is not a
    multiple of 4 are then pruned weight by weight. ``block_cols=4`` prunes 1 x 4 blocks
    (4 consecutive input features of one output row, starting on a multiple of 4), what
    the int8 kernels want (``ops.default_block_cols``); layers whose input count (all but
    the first dimension of the weight) is not a multiple of 4 are then pruned weight by
    weight. Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if name_filter is not None and not callable(name_filter):
        raise TypeError(f"name_filter must be callable, got {type(name_filter).__name__}")
    if not isinstance(block_rows, int) or isinstance(block_rows, bool):
        raise TypeError(f"block_rows must be an int, got {type(block_rows).__name__}")
    if block_rows not in (1, TALL_BLOCK_ROWS):
        raise ValueError(f"block_rows must be 1 or {TALL_BLOCK_ROWS}, got {block_rows}")
    if not isinstance(block_cols, int) or isinstance(block_cols, bool):
        raise TypeError(f"block_cols must be an int, got {type(block_cols).__name__}")
    if block_cols not in (1, WIDE_BLOCK_COLS):
        raise ValueError(f"block_cols must be 1 or {WIDE_BLOCK_COLS}, got {block_cols}")
    if block_rows > 1 and block_cols > 1:
        raise ValueError(f"block_rows={block_rows} and block_cols={block_cols}: prune in one block shape at a time")
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if not isinstance(layer_types, tuple) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types
    ):
        raise TypeError(f"layer_types must be a tuple of nn.Module classes, got {layer_types!r}")
    with torch.no_grad():
        for name, layer in module.named_modules():
            if not isinstance(layer, layer_types) or (name_filter and not name_filter(name)):
                continue
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(
                    f"layer_types includes {type(layer).__name__}, whose layer {name or 'module'!r} "
                    "has no weight tensor to prune"
                )
            if weight.numel() == 0:
                continue
            rows = block_rows if weight.size(0) % block_rows == 0 else 1
            cols = block_cols if (weight.numel() // weight.size(0)) % block_cols == 0 else 1
            # [groups of `rows` output rows, rows, column groups, cols]: one block per (row group, column group).
            blocks = weight.reshape(weight.size(0) // rows, rows, -1, cols)
            prune_count = int(round(sparsity * blocks.size(0) * blocks.size(2)))
            if prune_count == 0:
                continue
            order = blocks.norm(dim=(1, 3)).flatten().argsort()
            pruned = torch.zeros(blocks.size(0) * blocks.size(2), dtype=torch.bool, device=weight.device)
            pruned[order[:prune_count]] = True
            mask = pruned.view(blocks.size(0), 1, blocks.size(2), 1).expand(blocks.shape).reshape(weight.shape)
            weight.masked_fill_(mask, 0.0)
    return module
