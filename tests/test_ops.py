"""The custom ops as torch sees them: opcheck (schemas, fake kernels, autograd
registration), pack defaults, profiler names and gradients against dense. Their argument
errors are in test_argument_errors.py, corrupted packed buffers in test_packed_validation.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from torch_sparsecpu import ops

from conftest import ACTIVATION_REFERENCE, assert_close_rel, sparse_weight


def linear_samples():
    """(args) samples for sparsecpu::linear: inputs of 1 to 3 dims, strides, no
    tokens, bias or not, every activation, one K-block or several."""
    weight = sparse_weight(24, 16, 0.8)
    packed = ops.pack_linear(weight)
    bias = torch.randn(24)
    yield (torch.randn(5, 16), weight, packed, bias, "none")
    yield (torch.randn(2, 3, 16), weight, packed, None, "relu")
    yield (torch.randn(16, 7).t(), weight, packed, bias, "gelu")
    yield (torch.randn(4, 16), weight, packed, bias, "gelu_tanh")
    yield (torch.randn(1, 16), weight, packed, bias, "silu")
    yield (torch.randn(3, 16), weight, packed, bias, "relu6")
    weight = sparse_weight(32, 64, 0.8)
    packed = ops.pack_linear(weight, k_block=16, row_block=8)  # 4 K-blocks, 4 row blocks
    bias = torch.randn(32)
    yield (torch.randn(64), weight, packed, bias, "none")
    yield (torch.randn(64, 9).t(), weight, packed, None, "silu")
    yield (torch.randn(0, 64), weight, packed, bias, "gelu_tanh")


def _sample_id(args):
    return f"{tuple(args[0].shape)}-{args[4]}"


@pytest.mark.parametrize("args", list(linear_samples()), ids=_sample_id)
def test_opcheck_linear(args):
    torch.library.opcheck(torch.ops.sparsecpu.linear.default, args)


@pytest.mark.parametrize("args", list(linear_samples()), ids=_sample_id)
def test_opcheck_linear_with_grad(args):
    x, weight, packed, bias, activation = args
    args = (
        x.detach().clone().requires_grad_(),
        weight.clone().requires_grad_(),
        packed,
        None if bias is None else bias.clone().requires_grad_(),
        activation,
    )
    torch.library.opcheck(torch.ops.sparsecpu.linear.default, args)


def test_opcheck_pack_linear():
    torch.library.opcheck(torch.ops.sparsecpu.pack_linear.default, (sparse_weight(9, 13, 0.5), 4, 2))


def test_pack_defaults_agree():
    """The op schema's row_block default, the fake kernel's and the Python wrapper's are
    one value; a weight packed with no row_block says so in its header."""
    schema = {a.name: a.default_value for a in torch.ops.sparsecpu.pack_linear.default._schema.arguments}
    assert schema["row_block"] == ops.DEFAULT_ROW_BLOCK
    weight = sparse_weight(300, 20, 0.5)
    assert ops.packed_info(ops.pack_linear(weight)).row_block == ops.DEFAULT_ROW_BLOCK
    assert ops.packed_info(torch.ops.sparsecpu.pack_linear(weight)).row_block == ops.DEFAULT_ROW_BLOCK


def test_packed_info():
    """The header read by name: the word layout of docs/packed_format.md, and a clear
    error for anything that is not a packed buffer."""
    assert ops.HEADER_FIELDS == {
        "magic": 0,
        "version": 1,
        "out_features": 2,
        "in_features": 3,
        "k_block": 4,
        "num_k_blocks": 5,
        "row_block": 6,
        "num_row_blocks": 7,
        "nnz": 8,
        "block_rows": 9,
        "datatype": 10,
        "block_cols": 11,
    }
    weight = sparse_weight(24, 300, 0.9)
    info = ops.packed_info(ops.pack_linear(weight, k_block=128, row_block=8, block_rows=1))
    assert info == ops.PackedInfo(4, 24, 300, 128, 3, 8, 3, int(torch.count_nonzero(weight)), 1, "f32", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.nnz = 0
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        ops.packed_info([0] * 16)
    for bad in (torch.zeros(16), torch.zeros(2, 16, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="packed must be a 1-D int32 tensor"):
            ops.packed_info(bad)
    with pytest.raises(ValueError, match="packed is not a buffer made by pack_linear"):
        ops.packed_info(torch.zeros(16, dtype=torch.int32))


def test_opcheck_linear_chain():
    weights = [sparse_weight(24, 16, 0.8), sparse_weight(8, 24, 0.5)]
    packed = [ops.pack_linear(w) for w in weights]
    for x in (torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(16, 9).t()):
        torch.library.opcheck(
            torch.ops.sparsecpu.linear_chain.default, (x, weights, packed, [torch.randn(24), None], ["gelu", "none"])
        )


def test_profiler_names_the_op():
    x, weight, packed, bias, _ = next(linear_samples())
    with torch.profiler.profile() as prof:
        ops.linear(x, weight, packed, bias)
        ops.pack_linear(weight)
    names = {event.name for event in prof.events()}
    assert "sparsecpu::linear" in names and "sparsecpu::pack_linear" in names, names


@pytest.mark.parametrize("activation", list(ACTIVATION_REFERENCE))
def test_gradients_match_dense(activation):
    reference = ACTIVATION_REFERENCE[activation]
    weight = sparse_weight(32, 20, 0.7)
    bias = torch.randn(32)
    x = torch.randn(3, 5, 20)
    packed = ops.pack_linear(weight)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    dense_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grad = torch.randn(3, 5, 32)
    ops.linear(leaves[0], leaves[1], packed, leaves[2], activation).backward(grad)
    reference(F.linear(*dense_leaves)).backward(grad)
    for name, leaf, dense_leaf in zip(("input", "weight", "bias"), leaves, dense_leaves, strict=True):
        assert_close_rel(leaf.grad, dense_leaf.grad, rel=1e-4, what=f"grad of {name}")


@pytest.mark.parametrize(
    "bias_given, wants",
    [
        (False, ("input",)),
        (False, ("weight",)),
        (False, ("input", "weight")),
        (True, ("input",)),
        (True, ("weight",)),
        (True, ("bias",)),
        (True, ("weight", "bias")),
    ],
)
def test_gradients_of_some_leaves(bias_given, wants):
    """Only the leaves that require grad get one, with or without a bias: the autograd
    kernel indexes its inputs' edges, and a missing bias is not one of them."""
    weight = sparse_weight(24, 18, 0.7)
    packed = ops.pack_linear(weight)
    tensors = {"input": torch.randn(4, 18), "weight": weight.clone(), "bias": torch.randn(24) if bias_given else None}
    leaves = {k: (v.clone().requires_grad_(k in wants) if v is not None else None) for k, v in tensors.items()}
    dense = {k: (v.clone().requires_grad_(k in wants) if v is not None else None) for k, v in tensors.items()}
    grad = torch.randn(4, 24)
    ops.linear(leaves["input"], leaves["weight"], packed, leaves["bias"], "gelu").backward(grad)
    F.gelu(F.linear(dense["input"], dense["weight"], dense["bias"])).backward(grad)
    for name in ("input", "weight", "bias"):
        if leaves[name] is None:
            continue
        if name in wants:
            assert_close_rel(leaves[name].grad, dense[name].grad, rel=1e-4, what=f"grad of {name}")
        else:
            assert leaves[name].grad is None, name


def test_opcheck_linear_tall_blocks():
    weight = (torch.randn(6, 1, 16) * (torch.rand(6, 1, 16) > 0.7)).expand(6, 4, 16).reshape(24, 16).contiguous()
    packed = ops.pack_linear(weight, block_rows=4)
    torch.library.opcheck(torch.ops.sparsecpu.linear.default, (torch.randn(5, 16), weight, packed, None, "relu"))
    torch.library.opcheck(torch.ops.sparsecpu.pack_linear.default, (weight, 8, 8, 4))


@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_transposed_weight_matches_addmm(activation):
    """weight_transposed: a weight stored [in, out] (GPT-2's Conv1D), packed from
    weight.t(), gives act(addmm(bias, x, weight)) and its gradients; opcheck with and
    without grad."""
    weight = sparse_weight(20, 32, 0.7)  # [in, out]
    packed = ops.pack_linear(weight.t())
    x, bias, grad = torch.randn(6, 20), torch.randn(32), torch.randn(6, 32)
    torch.library.opcheck(torch.ops.sparsecpu.linear.default, (x, weight, packed, bias, activation, True))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    dense_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    args = (leaves[0], leaves[1], packed, leaves[2], activation, True)
    torch.library.opcheck(torch.ops.sparsecpu.linear.default, args)
    output = ops.linear(*args[:5], weight_transposed=True)
    expected = ACTIVATION_REFERENCE[activation](torch.addmm(dense_leaves[2], dense_leaves[0], dense_leaves[1]))
    assert_close_rel(output, expected, what="output")
    output.backward(grad)
    expected.backward(grad)
    for name, leaf, dense_leaf in zip(("input", "weight", "bias"), leaves, dense_leaves, strict=True):
        assert_close_rel(leaf.grad, dense_leaf.grad, rel=1e-4, what=f"grad of {name}")


def test_transposed_use_of_a_square_weight_is_another_weight():
    """A buffer packed from a square weight's transpose, first run with the weight read
    transposed, is not trusted for the same weight read as it is (a shape check could
    not tell them apart): the op packs the weight as it reads it."""
    weight, x = sparse_weight(16, 16, 0.7), torch.randn(3, 16)
    packed = ops.pack_linear(weight.t())
    assert_close_rel(ops.linear(x, weight, packed, weight_transposed=True), x @ weight, what="transposed")
    assert_close_rel(ops.linear(x, weight, packed), F.linear(x, weight), what="as it is")
