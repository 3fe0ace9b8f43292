"""What the backend leaves behind in Dynamo's state: explain() must not spend the
user's recompile budget, and blocks compiled one by one (regional compilation, where
Dynamo shares one graph between the instances of a class) must each keep their own
packed weights, and builds of what was folded from their tensors, instead of repacking
or rebuilding on every call."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import torch_sparsecpu


def _pruned_mlp() -> nn.Module:
    return torch_sparsecpu.magnitude_prune_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval(), 0.9)


def test_explain_leaves_the_recompile_budget_alone():
    model, x = _pruned_mlp(), torch.randn(4, 64)
    budget = torch._dynamo.config.recompile_limit
    for step in range(budget + 1):  # each a new backend: one cache entry each, were they shared
        torch_sparsecpu.explain(model, x, min_sparsity=step / (budget + 1))
    compiled = torch.compile(model, backend="sparsecpu")
    with torch.no_grad():
        with torch.profiler.profile() as prof:
            y = compiled(x)
        prof_ops = [e.name for e in prof.events()]
    assert any(name.startswith("sparsecpu::") for name in prof_ops), "the model ran without a sparse op"
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_explain_keeps_no_compiled_graph_alive():
    from torch_sparsecpu import backend

    graphs = []
    original_init = backend.SparseCompiledGraph.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        graphs.append(weakref.ref(self))

    model, x = _pruned_mlp(), torch.randn(4, 64)
    backend.SparseCompiledGraph.__init__ = recording_init
    try:
        torch_sparsecpu.explain(model, x)
        torch_sparsecpu.explain(model, x)
    finally:
        backend.SparseCompiledGraph.__init__ = original_init
    gc.collect()
    assert len(graphs) == 2 and all(ref() is None for ref in graphs)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(96, 384), nn.Linear(384, 96)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _ConvBlock(nn.Module):
    """A convolution whose batch norm the backend folds into it."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        with torch.no_grad():
            self.norm.running_mean.normal_()

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def _prune_hooked_block(sparsity: float) -> nn.Module:
    """A block whose weights torch.nn.utils.prune's hook computes on every call."""
    block = _Block().eval()
    for layer in (block.fc1, block.fc2):
        prune.l1_unstructured(layer, "weight", amount=sparsity)
    return block


# How each kind of block is made at a given sparsity, and its input.
BLOCKS = {
    "magnitude_pruned": (lambda sparsity: torch_sparsecpu.magnitude_prune_(_Block().eval(), sparsity), (8, 96)),
    "prune_hooks": (_prune_hooked_block, (8, 96)),
    "folded_batch_norm": (
        lambda sparsity: torch_sparsecpu.magnitude_prune_(_ConvBlock().eval(), sparsity, layer_types=(nn.Conv2d,)),
        (2, 8, 6, 6),
    ),
}


def _counting(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_regional_compilation_keeps_each_instances_packed_weights(kind, monkeypatch):
    """Blocks compiled one by one: Dynamo runs one graph for both instances, and
    neither may rebuild or repack on every call (a 100x slowdown before), also where a
    build folds an instance's tensors into the graph (a batch norm, a weight computed
    by a pruning hook). A build keeps no instance alive."""
    from torch_sparsecpu import backend, ops

    make_block, input_shape = BLOCKS[kind]
    blocks = [make_block(sparsity) for sparsity in (0.9, 0.85)]
    for block in blocks:
        block.compile(backend="sparsecpu", options={"inner": "eager"})
    x = torch.randn(input_shape)
    builds, packs = [], []
    monkeypatch.setattr(
        backend.SparseCompiledGraph, "_make_build", _counting(backend.SparseCompiledGraph._make_build, builds)
    )
    monkeypatch.setattr(ops, "pack_linear", _counting(ops.pack_linear, packs))
    with torch.no_grad():
        for block in blocks:  # the first calls compile once and pack the second instance once
            block(x)
        builds.clear(), packs.clear()
        repacked = torch_sparsecpu._C.repacked_weights()
        for _ in range(3):
            for block in blocks:  # block.forward: the eager module (its __call__ is compiled)
                torch.testing.assert_close(block(x), block.forward(x), rtol=1e-5, atol=1e-5)
    assert not builds and not packs, f"{len(builds)} rebuilds and {len(packs)} repacks in 6 alternating calls"
    assert torch_sparsecpu._C.repacked_weights() == repacked, "the ops repacked a weight that had not changed"
    second_instance = weakref.ref(blocks.pop())
    del block
    gc.collect()
    assert second_instance() is None, "a compiled graph keeps the second instance alive"
