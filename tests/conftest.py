"""Shared test helpers: fixed seeds, random sparse weights, the closeness rule, a small
pruned model to compile, child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_sparsecpu  # (loads the ops)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (tens of seconds each) run only with SLOW=1, as CI runs them
    (``SLOW=1 make test``); elsewhere they are reported as skipped."""
    if os.environ.get("SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


# What each fused activation name of ops.ACTIVATIONS computes, in plain PyTorch: the
# reference every kernel, op and property test compares against.
ACTIVATION_REFERENCE = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
}


def sparse_weight(out_features: int, in_features: int, sparsity: float, *, generator=None) -> torch.Tensor:
    """A random float32 weight with exactly round(sparsity * numel) zeros."""
    weight = torch.randn(out_features, in_features, generator=generator)
    zeros = int(round(sparsity * weight.numel()))
    if zeros:
        weight.view(-1)[torch.randperm(weight.numel(), generator=generator)[:zeros]] = 0.0
    return weight


def tall_weight(out_features: int, in_features: int, block_sparsity: float, *, fill: float = 1.0) -> torch.Tensor:
    """A random float32 weight whose nonzeros come in 4 x 1 blocks (4 consecutive output
    rows sharing an input feature): a ``block_sparsity`` fraction of the blocks is zero,
    and each value of the other blocks is kept with probability ``fill``."""
    assert out_features % 4 == 0
    blocks = torch.rand(out_features // 4, 1, in_features) >= block_sparsity
    kept = torch.rand(out_features // 4, 4, in_features) < fill
    return (torch.randn(out_features // 4, 4, in_features) * (blocks & kept)).reshape(out_features, in_features)


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "", scale: float | None = None
):
    """The correctness contract: max |actual - expected| <= rel * max |expected| (plus a
    tiny floor for all-zero outputs). Sum order differs from dense, nothing more.

    ``scale`` replaces max |expected| where an activation's steep tail magnifies the
    rounding of its input: pass the max |pre-activation| there."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale + 1e-30, f"{what}: max error {error:.3g} > {rel:g} x max |expected| {scale:.3g}"


# ---------------------------------------------------------------------------
# A small pruned model, compiled with the backend, and how many layers ran sparse
# ---------------------------------------------------------------------------
# Most compiled-model tests use the eager inner compiler to stay fast; one case per
# subject goes through Inductor.
EAGER = {"inner": "eager"}
SPARSITY = 0.9


def make_model(
    act: nn.Module | None = None, *, seed: int = 0, sparsity: float = SPARSITY, dtype: torch.dtype = torch.float32
) -> nn.Sequential:
    """64 -> 128 -> act (default ReLU) -> 32, magnitude-pruned to ``sparsity``."""
    gen = torch.Generator().manual_seed(seed)
    first, second = nn.Linear(64, 128), nn.Linear(128, 32)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.2)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    model = nn.Sequential(first, nn.ReLU() if act is None else act, second)
    torch_sparsecpu.magnitude_prune_(model, sparsity)
    return model.to(dtype).eval()


def compile_sparse(model, **kwargs):
    return torch.compile(model, backend="sparsecpu", **kwargs)


def sparse_op_calls(fn, *args) -> tuple[object, int]:
    """Runs ``fn(*args)`` under the profiler; returns its result and (a lower bound of) the
    number of linear and conv2d layers that ran on the sparse ops: one per ``sparsecpu::linear``
    or ``sparsecpu::conv2d`` call, two per ``sparsecpu::linear_chain`` or ``sparsecpu::conv_chain``
    call (a chain fuses two or more layers)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn(*args)
    per_call = {
        "sparsecpu::linear": 1,
        "sparsecpu::linear_chain": 2,
        "sparsecpu::conv2d": 1,
        "sparsecpu::conv_chain": 2,
    }
    layers = sum(e.count * per_call[e.key] for e in prof.key_averages() if e.key in per_call)
    return result, layers


def edit_weights(model: nn.Sequential, kind: str) -> None:
    """Edits a :func:`make_model` model's parameters in one of the ways a user may, after
    it was compiled: in place, by ``load_state_dict``, by ``.data`` or a new Parameter."""
    with torch.no_grad():
        if kind == "mul_":
            model[0].weight.mul_(2)
        elif kind == "zero_more":
            model[0].weight[:, :40] = 0
            model[2].weight[::2] = 0
        elif kind == "second_layer_setitem":
            model[2].weight[3, 7] = 5.0
        elif kind == "bias_add_":
            model[0].bias.add_(1)
            model[2].bias.add_(-1)
        elif kind == "load_state_dict":
            model.load_state_dict(make_model(seed=1).state_dict())
        elif kind == "load_state_dict_assign":
            model.load_state_dict(make_model(seed=2).state_dict(), assign=True)
        elif kind == "load_dense_state_dict":
            model.load_state_dict(make_model(seed=3, sparsity=0.0).state_dict())
        elif kind == "data_assign":
            model[0].weight.data = model[0].weight.data * 3
        elif kind == "new_parameter":
            model[2].weight = nn.Parameter(make_model(seed=4)[2].weight.detach().clone())
        elif kind == "data_mul_":
            model[0].weight.data.mul_(2)
        else:
            raise AssertionError(kind)


# ---------------------------------------------------------------------------
# Child processes, for checks whose regression would be a crash
# ---------------------------------------------------------------------------
# The child runs from the folder the package under test was imported from, so it
# imports that same package (the checkout's, or `make sanitize`'s instrumented copy).
_PACKAGE_ROOT = str(Path(torch_sparsecpu.__file__).resolve().parent.parent)


def run_child(code: str, *argv: str) -> str:
    """Runs ``python -c code argv...``; returns its stdout, failing if it did not exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=_PACKAGE_ROOT
    )
    assert proc.returncode == 0, (
        f"child died with return code {proc.returncode} after:\n{proc.stdout}\n{proc.stderr[-500:]}"
    )
    return proc.stdout


# ---------------------------------------------------------------------------
# The integer reference of int8 buffers (pack_linear(quantize="int8")), in
# float32 steps where the kernels use float32, int64 sums, and float64 for the epilogue
# (docs/kernels.md#int8-kernels)
# ---------------------------------------------------------------------------
def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): each row of ``weight`` quantized to int8, symmetric: q = clamp(round(w *
    (127 / max|w_row|)), -127, 127) (float32 products, round half to even), scale =
    max|w_row| / 127; a row of zeros has scale 0."""
    largest = weight.abs().amax(dim=1) if weight.size(1) else torch.zeros(weight.size(0))
    safe = torch.where(largest > 0, largest, torch.ones_like(largest))
    inv = torch.where(largest > 0, torch.tensor(127.0) / safe, torch.zeros_like(largest))
    q = torch.round(weight * inv[:, None]).clamp(-127, 127).to(torch.int64)
    return q, largest / 127.0


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero_point) of each token (row) of a 2-D ``x``: 7-bit unsigned over the
    range [min(x, 0), max(x, 0)]: scale = range / 127, inv = 127 / range (float32),
    zero_point = round(-min * inv), q = clamp(round(x * inv) + zero_point, 0, 127). A
    token of zeros or of a range too small for inv gets scale 0; one with a NaN or an
    infinity (or whose range overflows) scale NaN."""
    if x.size(1):
        lowest, highest = x.nan_to_num(nan=0.0).amin(dim=1), x.nan_to_num(nan=0.0).amax(dim=1)
    else:
        lowest = highest = torch.zeros(x.size(0))
    lowest, highest = lowest.clamp(max=0.0), highest.clamp(min=0.0)
    span = highest - lowest
    finite = torch.isfinite(x).all(dim=1) & torch.isfinite(span)
    inv = torch.tensor(127.0) / span
    usable = finite & torch.isfinite(inv)
    inv = torch.where(usable, inv, torch.zeros_like(inv))
    zero_point = torch.where(usable, torch.round(-lowest * inv).clamp(max=127.0), torch.zeros_like(inv))
    scale = torch.where(usable, span / 127.0, torch.zeros_like(span))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = (torch.round(x * inv[:, None]) + zero_point[:, None]).nan_to_num(nan=0.0).clamp(0.0, 127.0)
    return q.to(torch.int64), scale, zero_point.to(torch.int64)


def int8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the int8 kernels compute for ``F.linear(x, weight, bias)`` before the
    activation, for ``x`` of any rank: exact integer sums (int64) acc - zero_point * wsum,
    then fma(row_scale * token_scale, float32(sum), bias) with the product in float32 and
    the fma in float64, rounded once to float32 (the fma's single rounding, but for a
    rare double rounding: allow 1 ulp where there is a bias)."""
    x2d = x.reshape(-1, x.size(-1))
    q_w, w_scale = quantize_rows_int8(weight)
    q_x, x_scale, zero_point = quantize_tokens_int8(x2d)
    # float64 products and sums of integers below 2^53: exact, and faster than int64 matmul
    sums = (q_x.double() @ q_w.double().T).to(torch.int64) - zero_point[:, None] * q_w.sum(dim=1)[None, :]
    combined = x_scale[:, None] * w_scale[None, :]  # float32
    y = combined.double() * sums.to(torch.float32).double()
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], weight.size(0))
