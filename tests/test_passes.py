"""The graph passes on Dynamo's graph of a tiny model: what rewrite_sparse_layers leaves
in the graph and names in its RewriteResult, and the chain fusion after it."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.passes import find_static_tensors, fuse_sparse_chains, rewrite_sparse_layers
from torch_sparsecpu.passes.static import source_name

SPARSE = torch.ops.sparsecpu


def dynamo_graph(model, *args) -> tuple[fx.Graph, dict[fx.Node, torch.Tensor]]:
    """The graph Dynamo hands a backend for ``model(*args)`` (grad mode off), copied into
    a graph of its own as the backend does (the passes add get_attr nodes that no module
    holds yet), and its static tensors."""
    captured = []

    def capture(gm, example_inputs):
        graph, value_map = fx.Graph(), {}
        graph.output(graph.graph_copy(gm.graph, value_map))
        for old, new in value_map.items():
            if hasattr(old, "_dynamo_source"):
                new._dynamo_source = old._dynamo_source
        static = find_static_tensors(gm, example_inputs)
        captured.append((graph, {value_map[node]: value for node, value in static.items()}))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*args)
    assert len(captured) == 1
    return captured[0]


def targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


class ConvBnTiedLinear(nn.Module):
    """conv -> batch norm -> relu (folds), then one linear called twice (packed once)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.head(h).sigmoid())


def test_rewrite_result_names_what_the_backend_keeps():
    model = ConvBnTiedLinear().eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9, layer_types=(nn.Conv2d, nn.Linear))
    graph, static = dynamo_graph(model, torch.randn(2, 4, 6, 6))
    result = rewrite_sparse_layers(graph, static, min_sparsity=0.6, fuse_activations=True, fold_batch_norms=True)

    assert [(d.name, d.kind, d.taken, d.activation, d.batch_norm_folded) for d in result.decisions] == [
        ("conv.weight", "conv2d", True, "relu", True),
        ("head.weight", "linear", True, "none", False),
        ("head.weight", "linear", True, "none", False),
    ]
    # The folded convolution gets its own packed weight, folded weight and bias; the
    # linear's weight is packed once for both calls.
    assert list(result.attributes) == [
        "_sparsecpu_packed_0",
        "_sparsecpu_packed_0_weight",
        "_sparsecpu_packed_0_bias",
        "_sparsecpu_packed_3",
    ]
    assert {(source_name(n), t): a for (n, t), a in result.packed_attr_of.items()} == {
        ("head.weight", False): "_sparsecpu_packed_3"
    }
    assert sorted(map(source_name, result.rebuild_if_changed)) == [
        "conv.bias",
        "conv.weight",
        "norm.bias",
        "norm.weight",
    ]
    assert [source_name(n) for n in result.compared_by_value] == ["norm.running_mean", "norm.running_var"]
    calls = targets(graph)
    assert calls.count(SPARSE.conv2d.default) == 1 and calls.count(SPARSE.linear.default) == 2
    assert not any("batch_norm" in str(t) or "relu" in str(t) for t in calls), calls


def test_layers_not_taken_leave_the_graph_as_it_was():
    model = ConvBnTiedLinear().eval()  # nothing pruned
    graph, static = dynamo_graph(model, torch.randn(2, 4, 6, 6))
    before = str(graph)
    result = rewrite_sparse_layers(graph, static, min_sparsity=0.6, fuse_activations=True, fold_batch_norms=True)
    assert str(graph) == before
    assert [d.taken for d in result.decisions] == [False, False, False]
    assert all("below min_sparsity" in d.reason for d in result.decisions)
    assert not (result.attributes or result.packed_attr_of or result.rebuild_if_changed or result.compared_by_value)


def test_chain_fusion_after_the_rewrite():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8)).eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9)
    graph, static = dynamo_graph(model, torch.randn(3, 16))
    rewrite_sparse_layers(graph, static, min_sparsity=0.6, fuse_activations=True)
    assert targets(graph).count(SPARSE.linear.default) == 3
    assert fuse_sparse_chains(graph) == [3]
    assert targets(graph) == [SPARSE.linear_chain.default]
