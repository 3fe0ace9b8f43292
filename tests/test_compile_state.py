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
