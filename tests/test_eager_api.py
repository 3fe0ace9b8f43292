"""The eager API: magnitude_prune_, sparsify and its SparseLinear modules (which repack
after their weights are edited), and torch.export of a sparsified model, saved and
loaded with its sparse ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_sparsecpu

from conftest import assert_close_rel, make_model, sparse_op_calls


@pytest.mark.parametrize("block_rows", [1, 4])
def test_magnitude_prune_exact_sparsity_and_smallest_blocks(block_rows):
    """The sparsity fraction of blocks (single weights, or 4 x 1 blocks by L2 norm) with
    the smallest magnitude become zero and nothing else; a layer whose rows are not a
    multiple of 4 is pruned weight by weight."""
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 6))
    before = [layer.weight.detach().clone() for layer in model]
    torch_sparsecpu.magnitude_prune_(model, 0.75, block_rows=block_rows)
    for layer, original in zip(model, before, strict=True):
        rows = block_rows if original.size(0) % block_rows == 0 else 1
        norms = original.reshape(-1, rows, original.size(1)).norm(dim=1)
        zero = layer.weight.detach().reshape(-1, rows, original.size(1)).eq(0).all(dim=1)
        assert int(zero.sum()) == round(0.75 * zero.numel())
        assert norms[zero].max() <= norms[~zero].min()
        kept = layer.weight.detach() != 0
        assert torch.equal(layer.weight.detach()[kept], original[kept])


def test_sparsify_swaps_only_sparse_linears():
    model = make_model()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(32, 128))  # dense layer
    dense = copy.deepcopy(model)
    torch_sparsecpu.sparsify(model)
    assert isinstance(model[0], torch_sparsecpu.SparseLinear)
    assert type(model[2]) is nn.Linear
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert_close_rel(model(x), dense(x))


def test_sparsify_export_save_load(tmp_path):
    model = make_model(nn.GELU())
    dense = copy.deepcopy(model)
    sparse = torch_sparsecpu.sparsify(model)
    swapped = [m for m in sparse.modules() if isinstance(m, torch_sparsecpu.SparseLinear)]
    assert len(swapped) == 2
    assert not any(type(m) is nn.Linear for m in sparse.modules())

    x = torch.randn(6, 64)
    with torch.no_grad():
        y, calls = sparse_op_calls(sparse, x)
        assert calls == 2
        assert_close_rel(y, dense(x), what="sparsified eager")

    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(sparse, (x,), dynamic_shapes=({0: batch},))
    sparse_nodes = [
        n for n in ep.graph.nodes if n.op == "call_function" and n.target is torch.ops.sparsecpu.linear.default
    ]
    assert len(sparse_nodes) == 2, ep.graph
    assert not any(
        n.op == "call_function" and "linear" in str(n.target) and n not in sparse_nodes for n in ep.graph.nodes
    ), ep.graph

    path = tmp_path / "sparse_model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    loaded_nodes = [
        n for n in loaded.graph.nodes if n.op == "call_function" and n.target is torch.ops.sparsecpu.linear.default
    ]
    assert len(loaded_nodes) == 2
    with torch.no_grad():
        for program, what in ((ep, "exported"), (loaded, "loaded")):
            module = program.module()
            for rows in (6, 1, 33):
                x = torch.randn(rows, 64)
                assert_close_rel(module(x), dense(x), what=f"{what}, batch {rows}")


def test_sparse_linear_repacks_after_in_place_edit():
    model = torch_sparsecpu.sparsify(make_model())
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
        model[0].weight.mul_(-1.5)
        model[2].weight[:, ::3] = 0
        expected = F.linear(F.relu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
        assert_close_rel(model(x), expected)


def test_sparse_linear_repacks_after_data_assignment():
    model = torch_sparsecpu.sparsify(make_model())
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
        model[0].weight.data = model[0].weight.data * 3
        expected = F.linear(F.relu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
        assert_close_rel(model(x), expected)


def test_sparsified_model_loads_dense_checkpoint():
    model = torch_sparsecpu.sparsify(make_model())
    other = make_model(seed=5)
    model.load_state_dict(other.state_dict())
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_close_rel(model(x), other(x))
