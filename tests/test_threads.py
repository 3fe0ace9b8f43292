"""Threads: one compiled model called from several threads at once, and a call made while
another thread is rebuilding the graph after a weight edit, both give the dense answer."""

from __future__ import annotations

import threading

import torch
from torch import nn

import torch_sparsecpu.backend as backend

from conftest import EAGER, assert_close_rel, compile_sparse, edit_weights, make_model


def test_concurrent_calls_one_compiled_model():
    model = make_model(nn.SiLU())
    fast = compile_sparse(model, dynamic=True, options=EAGER)
    with torch.no_grad():  # compile every graph before the threads start
        for batch in (1, 3):
            fast(torch.randn(batch, 64))

    errors: list[str] = []
    barrier = threading.Barrier(4)

    def worker(tid: int):
        gen = torch.Generator().manual_seed(100 + tid)
        barrier.wait()
        try:
            with torch.no_grad():
                for it in range(40):
                    batch = int(torch.randint(2, 48, (1,), generator=gen))
                    x = torch.randn(batch, 64, generator=gen)
                    y = fast(x)
                    expected = model(x)
                    scale = expected.abs().max().item()
                    err = (y - expected).abs().max().item()
                    if y.shape != expected.shape or err > 1e-5 * scale:
                        errors.append(f"thread {tid} iter {it}: error {err:.3g} (scale {scale:.3g})")
        except Exception as exc:
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:5]


def test_concurrent_call_during_repack(monkeypatch):
    model = make_model()
    fast = compile_sparse(model, options=EAGER)
    x = torch.randn(5, 64)
    with torch.no_grad():
        fast(x)
        edit_weights(model, "zero_more")  # changes the nonzero count: a rebuild, not an in-place repack
        expected = model(x)

    in_compile, proceed = threading.Event(), threading.Event()
    original = backend._inner_compile

    def slow_inner_compile(*args, **kwargs):
        in_compile.set()
        proceed.wait(timeout=30)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "_inner_compile", slow_inner_compile)
    results: dict[str, torch.Tensor] = {}

    def call(name):
        with torch.no_grad():
            results[name] = fast(x)

    repacker = threading.Thread(target=call, args=("repacker",))
    repacker.start()
    try:
        assert in_compile.wait(timeout=30), "the edit did not trigger a repack"
        other = threading.Thread(target=call, args=("other",))
        other.start()
        other.join(timeout=1.0)  # returns early only if it did not wait for the repack
    finally:
        proceed.set()
        repacker.join(timeout=30)
    other.join(timeout=30)
    assert_close_rel(results["repacker"], expected, what="thread that repacked")
    assert_close_rel(results["other"], expected, what="thread that called during the repack")
