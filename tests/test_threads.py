"""Threads: one compiled model called from several threads at once, and a call made while
another thread is rebuilding the graph after a weight edit, both give the dense answer."""

from __future__ import annotations

import threading

import torch
from torch import nn

import torch_sparsecpu
import torch_sparsecpu.backend as backend

from conftest import EAGER, SPARSITY, assert_close_rel, compile_sparse, make_model


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


def test_concurrent_call_during_rebuild(monkeypatch):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    torch_sparsecpu.magnitude_prune_(model, SPARSITY, layer_types=(nn.Conv2d,))
    fast = compile_sparse(model, options=EAGER)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fast(x)
        model[1].weight.mul_(2)  # folded into the convolution: a rebuild
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

    rebuilder = threading.Thread(target=call, args=("rebuilder",))
    rebuilder.start()
    try:
        assert in_compile.wait(timeout=30), "the edit did not trigger a rebuild"
        other = threading.Thread(target=call, args=("other",))
        other.start()
        other.join(timeout=1.0)  # returns early only if it did not wait for the rebuild
    finally:
        proceed.set()
        rebuilder.join(timeout=30)
    other.join(timeout=30)
    assert_close_rel(results["rebuilder"], expected, what="thread that rebuilt")
    assert_close_rel(results["other"], expected, what="thread that called during the rebuild")
