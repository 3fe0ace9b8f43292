"""One packed buffer per weight, shared by every graph compiled from it.

Dynamo compiles a model's forward several times: ``generate()`` runs a prefill graph and
a decode graph, Inductor's layouts can change a cache tensor's strides and recompile the
decode graph once, and a specialised float restarts the analysis
(``TensorifyScalarRestartAnalysis``) after the backend already ran. Each build packing
every weight again cost seconds per build for an 8-layer Llama, and left each graph
holding its own copy of the packed weights. A weight's buffer is kept while the weight
lives and reused while it reads what it read when packed: the same version, storage,
offset, sizes and strides (an edit after that packs again, like the ops' own check in
csrc/ops/packed_weights.h). One weight may have buffers of several kinds, told apart by
how they were packed: under ``quantize="int8"`` a prefill graph (many tokens) packs a
weight as fp32 and the decode graph (one token) as int8 (``ops.int8_pays``), and
neither is handed to the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_lock = threading.Lock()
# weight -> {(weight_transposed, pack function, quantize): (the weight's identity when packed, buffer)}
_buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """What a tensor reads and its version: an in-place edit bumps the version, and
    ``weight.data = other`` (even another view of the same storage) changes the rest.
    Inference tensors have no version and cannot be edited outside inference mode (a
    pruned module's weight is one after an eager call under ``torch.inference_mode``)."""
    version = 0 if tensor.is_inference() else tensor._version
    return version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


def packed_once(
    weight: torch.Tensor,
    pack: Callable[..., torch.Tensor],
    *,
    weight_transposed: bool = False,
    quantize: str | None = None,
) -> torch.Tensor:
    """``pack`` of ``weight`` as the sparse ops take it (``[out, in]``: transposed first
    when ``weight_transposed``, a convolution's flattened to ``[out, in x kernel]``), with
    ``quantize=quantize`` unless it is None (fp32), from an earlier build when the weight
    has not changed since and was packed the same way."""
    key, identity = (weight_transposed, pack, quantize), tensor_identity(weight)
    with _lock:
        known = _buffers.get(weight, {}).get(key)
    if known is not None and known[0] == identity:
        return known[1]
    matrix = weight.detach()
    matrix = matrix.t() if weight_transposed else matrix.flatten(1)
    packed = pack(matrix) if quantize is None else pack(matrix, quantize=quantize)
    with _lock:
        _buffers.setdefault(weight, {})[key] = (identity, packed)
    return packed
