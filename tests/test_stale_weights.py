"""Weights edited after compiling: every kind of edit (in place, load_state_dict, .data,
a new Parameter) is seen by the next call, whose ops then run a buffer packed from the
weight as it is (csrc/ops/packed_weights.h), and stays on the sparse path. The eager
API's SparseLinear is in test_eager_api.py, convolutions and their folded batch norms in
test_conv.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_sparsecpu

from conftest import EAGER, assert_close_rel, compile_sparse, edit_weights, make_model, run_child, sparse_op_calls

STALE_KINDS = [
    "mul_",
    "zero_more",
    "second_layer_setitem",
    "bias_add_",
    "load_state_dict",
    "load_state_dict_assign",
    "load_dense_state_dict",
    "data_assign",
    "new_parameter",
    pytest.param(
        "data_mul_",
        marks=pytest.mark.xfail(
            strict=True,
            reason=(
                "limitation: staleness is detected with tensor._version and what the tensor reads; "
                "an edit through .data (weight.data.mul_) changes neither, so the old packed weight is "
                "used silently"
            ),
        ),
    ),
]


@pytest.mark.parametrize("kind", STALE_KINDS)
def test_stale_weights_eager_inner(kind):
    model = make_model()
    fast = compile_sparse(model, options=EAGER)
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert_close_rel(fast(x), model(x), what="before edit")
        edit_weights(model, kind)
        expected = model(x)
        assert_close_rel(fast(x), expected, what=f"after {kind}")
        y, calls = sparse_op_calls(fast, x)  # second call after the edit: no rebuild
        assert_close_rel(y, expected, what=f"second call after {kind}")
        if kind != "load_dense_state_dict":
            assert calls >= 2, "the edited model no longer takes the sparse path"


def test_stale_weights_inductor():
    model = make_model()
    fast = compile_sparse(model)
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert_close_rel(fast(x), model(x), what="before edit")
        edit_weights(model, "mul_")
        assert_close_rel(fast(x), model(x), what="after mul_")
        edit_weights(model, "load_state_dict")
        y, calls = sparse_op_calls(fast, x)
        assert_close_rel(y, model(x), what="after load_state_dict")
        assert calls >= 2


@pytest.mark.parametrize("kind", ["mul_", "zero_more"])  # same nonzero count / another one
def test_stale_weights_inductor_dynamic_shapes(kind):
    """After an edit the graph keeps serving every batch size, whether the new packed
    buffer has the old one's size or not (the ops hold it, not the graph)."""
    model = make_model()
    fast = compile_sparse(model, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 64)
            assert_close_rel(fast(x), model(x))
        edit_weights(model, kind)
        for batch in (6, 7, 9):
            x = torch.randn(batch, 64)
            assert_close_rel(fast(x), model(x), what=f"batch {batch} after edit")


@pytest.mark.parametrize("backend", ["eager", "inductor", "sparsecpu"])
def test_sparsified_model_under_compile_sees_weight_edits(backend):
    """SparseLinear skips its own repack check while compiling; the op must not then
    run the packed copy of the weight as it was."""
    model = torch_sparsecpu.sparsify(nn.Sequential(torch_sparsecpu.magnitude_prune_(nn.Linear(32, 16).eval(), 0.9)))
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 32)
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(2)
        expected = x @ model[0].weight.T + model[0].bias
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_weight_data_swapped_to_another_view_of_the_same_storage(inner):
    """``weight.data = bank[1]`` after ``bank[0]``: same storage, another offset."""
    bank = torch.randn(2, 256, 256) * (torch.rand(2, 256, 256) > 0.9)
    layer = nn.Linear(256, 256).eval()
    layer.weight.data = bank[0]
    compiled = torch.compile(layer, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(8, 256)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
        layer.weight.data = bank[1]
        torch.testing.assert_close(compiled(x), x @ bank[1].T + layer.bias, rtol=1e-5, atol=1e-5)


def test_buffer_stays_bound_to_its_freed_weight_when_the_tables_are_swept():
    """``weight.data = ...`` frees the weight a buffer was first used with; the tables'
    sweep (as they grow past 64 entries) must not then forget that use, or the next call
    trusts the buffer for the new weight. A fresh process, so the sweep's threshold is
    known."""
    code = """
import torch
from torch_sparsecpu import ops
weight = torch.nn.Parameter(torch.randn(32, 64) * (torch.rand(32, 64) > 0.8), requires_grad=False)
packed = ops.pack_linear(weight)
x = torch.randn(4, 64)
ops.linear(x, weight, packed)
weight.data = weight.data * 3
expected = x @ weight.T
for _ in range(2):  # the first call repacks; the second is the one a lost binding would break
    torch.testing.assert_close(ops.linear(x, weight, packed), expected, rtol=1e-5, atol=1e-5)
    for _ in range(100):  # new buffers, each remembered and dropped: the tables are swept
        other = torch.randn(8, 64)
        ops.linear(x, other, ops.pack_linear(other))
print("ok")
"""
    assert run_child(code).strip() == "ok"
