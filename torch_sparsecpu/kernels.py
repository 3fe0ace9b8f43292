"""Which ISA's kernels run: chosen once at load time (the best this CPU has),
forced by ``TORCH_SPARSECPU_ISA=scalar|vec16|avx2|avx512`` or by :func:`force_isa`; and on
how many threads (:func:`torch_threads`). ``vec16`` (the 16-lane kernels on portable
vectors, for the tests) runs on every CPU but is never chosen by default."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from . import _C

T = TypeVar("T")

# Every ISA the extension has kernels for, as csrc/kernels/lists.h lists them.
ISAS: tuple[str, ...] = tuple(_C.ISAS)


def isa() -> str:
    """The ISA whose kernels the sparse ops run now."""
    return _C.isa()


def available_isas() -> list[str]:
    """ISAs this CPU can run, always including ``"scalar"``."""
    return list(_C.available_isas())


def _check_isa_name(isa_name) -> None:
    if isa_name not in ISAS:
        raise ValueError(f"isa_name must be one of {', '.join(ISAS)}, got {isa_name!r}")


def kernel_names(isa_name: str, datatype: str = "f32") -> list[str]:
    """Register tiles of one ISA for one datatype of packed buffers (``ops.DATATYPES``),
    e.g. ``spmm_f32_1x64__avx2`` (1 row x 64 tokens) and the GEMV kernels
    ``spmv_f32_1x1__avx2`` ... ``spmv_f32_1x7__avx2``; for ``"int8"``,
    ``spmm_qd8_f32_qc8w_1x4x64__avx2`` (1 x 4 blocks, 64 tokens) and so on. The int8
    kernels of ``avx512`` are named ``__avx512vnni`` on a CPU with AVX512-VNNI, ``__avx2``
    elsewhere (the ones it runs there)."""
    _check_isa_name(isa_name)
    if datatype not in _C.DATATYPES:
        raise ValueError(f"datatype must be one of {', '.join(_C.DATATYPES)}, got {datatype!r}")
    return list(_C.kernel_names(isa_name, datatype))


def max_panel_width(isa_name: str) -> int:
    """Tokens per full activation panel of one ISA's kernels."""
    _check_isa_name(isa_name)
    return int(_C.max_panel_width(isa_name))


@contextlib.contextmanager
def _temporarily(get: Callable[[], T], set_: Callable[[T], object], value: T) -> Iterator[None]:
    """``set_(value)`` inside the ``with`` block, the value ``get()`` had restored after."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def force_isa(isa_name: str) -> contextlib.AbstractContextManager[None]:
    """Run the sparse ops with one ISA's kernels inside the ``with`` block (process-wide)."""
    _check_isa_name(isa_name)
    if isa_name not in available_isas():
        raise ValueError(
            f"isa_name {isa_name!r} is not supported by this CPU (available: {', '.join(available_isas())})"
        )
    return _temporarily(_C.isa, _C.set_isa, isa_name)


def torch_threads(threads: int) -> contextlib.AbstractContextManager[None]:
    """``torch.set_num_threads(threads)`` inside the ``with`` block, restored after (the
    sparse ops split their work over torch's threads)."""
    return _temporarily(torch.get_num_threads, torch.set_num_threads, threads)
