"""Non-finite inputs. Skipping a zero weight skips its product too, so an input NaN or
Inf reaches exactly the outputs that have a nonzero weight on that feature; eager
dense computes 0 x NaN = NaN for the whole row (README, correctness contract)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_sparsecpu import kernels, ops

from conftest import ACTIVATION_REFERENCE, assert_close_rel, sparse_weight


def _poisoned_input(tokens: int, features: int, value: float) -> torch.Tensor:
    x = torch.randn(tokens, features)
    x[0, 3] = value
    x[tokens - 1, features - 1] = value
    x[tokens // 2, :2] = value
    return x


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_reaches_exactly_the_outputs_with_a_nonzero_weight(isa, tokens, value):
    weight = sparse_weight(48, 40, 0.9)
    bias = torch.randn(48)
    x = _poisoned_input(tokens, 40, value)
    poisoned = ~torch.isfinite(x)
    with kernels.force_isa(isa):
        y = ops.linear(x, weight, ops.pack_linear(weight), bias)
    reached = (poisoned.float() @ (weight != 0).float().T) > 0  # [tokens, out]: a nonzero weight meets it
    assert torch.equal(~torch.isfinite(y), reached), "non-finite outputs are not those with a nonzero weight on it"
    assert not torch.isfinite(F.linear(x, weight, bias)[poisoned.any(1)]).any(), "eager: the whole row"
    finite = F.linear(torch.where(poisoned, 0.0, x), weight, bias)
    assert_close_rel(torch.where(reached, 0.0, y), torch.where(reached, 0.0, finite), what=isa)
    if value != value:  # NaN stays NaN where it arrives
        assert torch.isnan(y[reached]).all()


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_nan_stays_nan_through_every_fused_activation(isa, tokens, activation):
    """A NaN input reaches the same outputs with every activation, as PyTorch's own
    activations keep NaN (x86's max/min would drop it if the operands were swapped)."""
    weight = sparse_weight(48, 40, 0.9)
    x = _poisoned_input(tokens, 40, float("nan"))
    reached = (torch.isnan(x).float() @ (weight != 0).float().T) > 0
    with kernels.force_isa(isa):
        y = ops.linear(x, weight, ops.pack_linear(weight), None, activation)
    assert torch.equal(torch.isnan(y), reached)
    assert torch.isnan(ACTIVATION_REFERENCE[activation](torch.tensor([float("nan")]))).all()
