"""Reliability costs of the sparsecpu backend.

(a) The check of what a build folded into the graph: before every call the backend's
    wrapper (torch_sparsecpu.backend.SparseCompiledGraph) compares the tensors it watches
    (those of folded batch norms; none in a model of linears) with what they were at
    build time. We time, on a tiny input, the wrapper call against a call of its compiled
    graph (``_build.compiled``) with the same arguments. The call through torch.compile
    (Dynamo guards + wrapper + graph) is shown for scale.
(b) The ops' own check that a packed buffer belongs to the weight it is given
    (csrc/ops/packed_weights.h): ``ops.linear`` on a tiny layer with the weight the buffer
    was packed from (one table probe) against the same call with another weight of the
    same shape, whose buffer the ops packed once and keep (two probes): what an instance
    pays when Dynamo shares its graph with another (regional compilation).
(c) Memory: RSS growth over many calls of a compiled small sparse model. Exits with
    status 1 if it grows by more than --limit-mb.

    .venv/bin/python benchmarks/bench_reliability.py [--calls 5000] [--limit-mb 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import sys

import torch
import torch.utils.benchmark as benchmark
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.backend import SparseCompiledGraph, SparseCPUOptions, compile_sparse

PAGE = os.sysconf("SC_PAGE_SIZE")


def make_model(layers: int, width: int = 64, sparsity: float = 0.9) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i + 1 < layers:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity)
    return model


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    if error > 1e-5 * scale + 1e-30:
        sys.exit(f"{what}: wrong result (max error {error:.3g}, scale {scale:.3g}); not timing")


def median_us(fn, min_run_time: float) -> float:
    # One thread: the check is Python-side, and on a busy machine OpenMP wake-ups of a
    # second thread would swamp a difference of a few microseconds.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def graph_parts(graph: SparseCompiledGraph):
    """(compiled graph without the wrapper, the check, number of watched tensors)."""
    build = graph._build
    return build.compiled, build.is_stale, len(build.watched)


def wrapper_check_cost(layers: int, min_run_time: float) -> None:
    """Medians over min_run_time seconds, best of three interleaved rounds."""
    torch._dynamo.reset()
    model = make_model(layers)
    captured: dict[str, object] = {}

    # One sparsecpu::linear per layer (no chain fusion, where the backend has it): the
    # check's cost depends on the number of packed weights, not on how they run.
    fields = {f.name for f in dataclasses.fields(SparseCPUOptions)}
    options = SparseCPUOptions(inner="eager", **({"fuse_layers": False} if "fuse_layers" in fields else {}))

    def backend(gm, example_inputs):
        compiled = compile_sparse(gm, example_inputs, options)
        captured["graph"], captured["args"] = compiled, list(example_inputs)
        return compiled

    fast = torch.compile(model, backend=backend)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = model(x)
        check_close(fast(x), expected, "torch.compile")
        graph = captured["graph"]
        if not isinstance(graph, SparseCompiledGraph):
            sys.exit("the backend took no sparse layer; nothing to measure")
        # Dynamo's example inputs are the graph's placeholders: the real parameters and
        # the x of the first call.
        args = captured["args"]
        if not any(a is x for a in args):
            sys.exit("could not find the input among the graph's example inputs")
        inner, is_stale, watched = graph_parts(graph)
        check_close(graph(*args)[0], expected, "wrapper")
        check_close(inner(*args)[0], expected, "graph without wrapper")
        if is_stale(args):
            sys.exit("the stale check fires on unchanged weights")

        # Interleave the two so that drifting machine load hits both alike.
        t_graph, t_wrapper = [], []
        for _ in range(3):
            t_graph.append(median_us(lambda: inner(*args), min_run_time))
            t_wrapper.append(median_us(lambda: graph(*args), min_run_time))
        t_graph_min, t_wrapper_min = min(t_graph), min(t_wrapper)
        t_check = median_us(lambda: is_stale(args), min_run_time)
        t_compiled = median_us(lambda: fast(x), min_run_time)

    diff = t_wrapper_min - t_graph_min
    print(f"{layers} sparse layers, {watched} watched tensors, input {tuple(x.shape)}, 1 thread:")
    print(f"  graph without wrapper (compiled)    {t_graph_min:9.2f} us")
    print(f"  wrapper (SparseCompiledGraph)       {t_wrapper_min:9.2f} us")
    print(f"  difference                          {diff:9.2f} us  ({100 * diff / t_graph_min:.1f}% of the graph)")
    print(f"  the wrapper's check alone           {t_check:9.2f} us")
    print(f"  through torch.compile (for scale)   {t_compiled:9.2f} us")


def op_check_cost(min_run_time: float) -> None:
    """Medians over min_run_time seconds, best of three interleaved rounds."""
    torch.manual_seed(0)
    own, other = (torch.randn(16, 64) * (torch.rand(16, 64) > 0.9) for _ in range(2))
    packed = torch_sparsecpu.ops.pack_linear(own)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        for weight in (own, other):  # the first call records `own`, the second packs `other` once
            check_close(torch_sparsecpu.ops.linear(x, weight, packed), x @ weight.T, "ops.linear")
        rounds = [
            (
                median_us(lambda: torch_sparsecpu.ops.linear(x, own, packed), min_run_time),
                median_us(lambda: torch_sparsecpu.ops.linear(x, other, packed), min_run_time),
            )
            for _ in range(3)
        ]
    t_own, t_other = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"ops.linear, 16 x 64 at 90%, 1 token, 1 thread (repacked so far: {torch_sparsecpu._C.repacked_weights()}):")
    print(f"  with the weight the buffer was packed from   {t_own:8.2f} us")
    print(f"  with another instance's weight               {t_other:8.2f} us  ({t_other - t_own:+.2f} us)")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def memory_growth(calls: int, limit_mb: float, inner: str) -> bool:
    torch._dynamo.reset()
    model = make_model(2, width=128)
    fast = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(8, 128)
    with torch.inference_mode():
        check_close(fast(x), model(x), "memory model")
        for _ in range(200):  # warm up allocators and caches
            fast(x)
        gc.collect()
        before = rss_mb()
        for i in range(calls):
            x = torch.randn(8, 128) if i % 100 == 0 else x
            fast(x)
        gc.collect()
        after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    growth = after - before
    ok = growth <= limit_mb
    print(
        f"RSS over {calls} calls (inner={inner}): {before:.1f} MB -> {after:.1f} MB, "
        f"growth {growth:+.2f} MB (limit {limit_mb} MB), peak RSS {peak:.1f} MB: "
        f"{'OK' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--limit-mb", type=float, default=10.0)
    parser.add_argument(
        "--inner", choices=("eager", "inductor"), default="eager", help="inner compiler of the memory check"
    )
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels {torch_sparsecpu.isa()}")
    print("(a) cost of the wrapper's check")
    for layers in (2, 8):
        wrapper_check_cost(layers, args.min_run_time)
    print("(b) cost of the ops' packed-weight check")
    op_check_cost(args.min_run_time)
    print("(c) memory")
    return 0 if memory_growth(args.calls, args.limit_mb, args.inner) else 1


if __name__ == "__main__":
    sys.exit(main())
