"""Shared test helpers: fixed seeds, random sparse weights, the closeness rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_sparsecpu  # noqa: F401  (loads the ops)


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


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "",
                     scale: float | None = None):
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
