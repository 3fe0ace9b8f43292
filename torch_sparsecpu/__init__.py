"""torch_sparsecpu: run pruned networks fast on CPUs through ``torch.compile``.

    fast = torch.compile(model, backend="sparsecpu")

The backend is registered through the ``torch_dynamo_backends`` entry point, so
user code needs no import of this package. Importing it loads the C++ ops
(``torch.ops.sparsecpu.*``).
"""

from __future__ import annotations

import logging
import os

import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C, ops  # noqa: F401  (_C registers torch.ops.sparsecpu.*)
from .backend import SparseCPUOptions, explain, sparsecpu_backend
from .kernels import available_isas, force_isa, isa
from .prune import magnitude_prune_
from .sparsify import SparseLinear, sparsify

__all__ = [
    "SparseCPUOptions",
    "SparseLinear",
    "available_isas",
    "explain",
    "force_isa",
    "isa",
    "magnitude_prune_",
    "sparsecpu_backend",
    "sparsify",
]
__version__ = "0.1.0"

log = logging.getLogger("torch_sparsecpu")
_forced = os.environ.get("TORCH_SPARSECPU_ISA")
if _forced and _forced != _C.isa():
    log.warning(
        "TORCH_SPARSECPU_ISA=%r is not usable on this CPU (available: %s); using %s",
        _forced,
        ", ".join(_C.available_isas()),
        _C.isa(),
    )
log.debug("sparse kernels: %s (available: %s)", _C.isa(), ", ".join(_C.available_isas()))
