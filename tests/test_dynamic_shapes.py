"""Dynamic shapes: one compiled model serves every batch, sequence length and input rank,
on the sparse path each time; the fake kernel keeps symbolic sizes symbolic.

Every check compares against the eager dense model (DESIGN.md's contract: fp32 within
1e-5 relative)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_sparsecpu import ops

from conftest import EAGER, assert_close_rel, compile_sparse, make_model, sparse_op_calls, sparse_weight

BATCHES = (1, 3, 17, 64)
SEQS = (5, 11, 2)


@pytest.mark.parametrize(
    "dynamic,fuse_layers", [(True, True), (None, True), (True, False)], ids=["dynamic", "automatic", "dynamic-unfused"]
)
def test_dynamic_shapes_eager_inner(dynamic, fuse_layers):
    model = make_model()
    fast = compile_sparse(model, dynamic=dynamic, options={**EAGER, "fuse_layers": fuse_layers})
    with torch.inference_mode():
        for batch in BATCHES:
            for seq in SEQS:
                x = torch.randn(batch, seq, 64)
                y, calls = sparse_op_calls(fast, x)
                assert calls >= 2, f"sparse path not taken for input {tuple(x.shape)}"
                assert_close_rel(y, model(x), what=f"batch {batch} seq {seq}")
        # other ranks still work after the 3-D graphs were compiled
        for x in (torch.randn(7, 64), torch.randn(64), torch.randn(2, 3, 4, 64)):
            assert_close_rel(fast(x), model(x), what=f"input {tuple(x.shape)}")


def test_dynamic_shapes_inductor():
    model = make_model(nn.GELU())
    fast = compile_sparse(model, dynamic=True)
    with torch.inference_mode():
        for batch, seq in ((3, 5), (17, 2), (64, 9), (1, 7), (5, 13)):
            x = torch.randn(batch, seq, 64)
            y, calls = sparse_op_calls(fast, x)
            assert calls >= 2, f"sparse path not taken for input {tuple(x.shape)}"
            assert_close_rel(y, model(x), what=f"batch {batch} seq {seq}")


def test_fake_kernel_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    weight = sparse_weight(32, 64, 0.9)
    packed = ops.pack_linear(weight)
    bias = torch.randn(32)

    def fn(x, weight, packed, bias):
        return ops.linear(x, weight, packed, bias, "relu")

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(3, 5, 64), weight, packed, bias)
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.sparsecpu.linear.default]
    out_val = node.meta["val"]
    assert isinstance(out_val.shape[0], torch.SymInt) and isinstance(out_val.shape[1], torch.SymInt)
    assert isinstance(out_val.shape[2], torch.SymInt)  # weight.size(0), also symbolic here
    assert str(out_val.shape[2]) == str(node.args[1].meta["val"].shape[0])
    for shape in ((2, 1, 64), (4, 9, 64), (1, 1, 64)):
        x = torch.randn(*shape)
        assert_close_rel(gm(x, weight, packed, bias), F.relu(F.linear(x, weight, bias)))
