"""What the backend leaves behind in Dynamo's state: explain() must not spend the
user's recompile budget, and blocks compiled one by one (regional compilation, where
Dynamo shares one graph between the instances of a class) must each keep their own
packed weights instead of repacking on every call."""

from __future__ import annotations

import torch
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
    import gc
    import weakref

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


def _counting(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted


def test_regional_compilation_keeps_each_instances_packed_weights(monkeypatch):
    """Blocks compiled one by one: Dynamo runs one graph for both instances, and
    neither may rebuild or repack on every call (a 100x slowdown before)."""
    from torch_sparsecpu import backend, ops

    blocks = [torch_sparsecpu.magnitude_prune_(_Block().eval(), sparsity) for sparsity in (0.9, 0.85)]
    for block in blocks:
        block.compile(backend="sparsecpu", options={"inner": "eager"})
    x = torch.randn(8, 96)
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
