"""The sparsecpu torch.compile backend: what it rewrites, what it leaves, its options
(their errors are in test_argument_errors.py), what a compiled graph holds on to."""

from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import torch_sparsecpu

from conftest import EAGER, assert_close_rel, compile_sparse, make_model

SPARSE_CALL = re.compile(r"= torch\.ops\.sparsecpu\.linear\.default\(")
CHAIN_CALL = re.compile(r"= torch\.ops\.sparsecpu\.linear_chain\.default\(\w+, \[([^\]]*)\]")


def ffn(sparsity=0.9, activation=nn.GELU):
    model = nn.Sequential(nn.Linear(64, 256), activation(), nn.Linear(256, 64)).eval()
    return torch_sparsecpu.magnitude_prune_(model, sparsity)


def sparse_calls_in_inductor_code(compiled, *args) -> tuple[torch.Tensor, int]:
    """Runs ``compiled`` and counts the linear layers its Inductor code runs sparse:
    one per ``sparsecpu::linear`` call plus the layers of each ``linear_chain`` call."""
    output, code = run_and_get_code(compiled, *args)
    singles = sum(len(SPARSE_CALL.findall(c)) for c in code)
    chained = sum(len(weights.split(",")) for c in code for weights in CHAIN_CALL.findall(c))
    return output, singles + chained


def test_chains_fused_only_without_grad():
    model = ffn()
    x = torch.randn(3, 64)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, backend="sparsecpu"), x)
    assert len(CHAIN_CALL.findall(code[0])) == 1 and not SPARSE_CALL.findall(code[0])
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(model, backend="sparsecpu"), x)  # grad mode on
    # Separate layers (the forward may also keep a pre-activation for backward).
    assert not CHAIN_CALL.findall(code[0]) and len(SPARSE_CALL.findall(code[0])) >= 2
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, backend="sparsecpu", options={"fuse_layers": False}), x)
    assert not CHAIN_CALL.findall(code[0]) and len(SPARSE_CALL.findall(code[0])) == 2


@pytest.mark.parametrize(
    "activation,fused",
    [
        (nn.ReLU, "relu"),
        (nn.GELU, "gelu"),
        (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.SiLU, "silu"),
        (nn.ReLU6, "relu6"),
        (lambda: nn.Hardtanh(0.0, 6.0), "relu6"),
        (nn.Hardswish, "hardswish"),
        (lambda: nn.Hardtanh(-1.0, 1.0), "none"),
        (nn.Identity, "none"),
    ],
)
def test_ffn_rewritten_and_matches_eager(activation, fused):
    model = ffn(activation=activation)
    x = torch.randn(4, 33, 64)
    compiled = torch.compile(model, backend="sparsecpu")
    with torch.inference_mode():
        actual, calls = sparse_calls_in_inductor_code(compiled, x)
        expected = model(x)
    assert calls == 2
    assert_close_rel(actual, expected)
    decisions = torch_sparsecpu.explain(model, x)
    assert [d.taken for d in decisions] == [True, True]
    assert decisions[0].activation == fused and decisions[1].activation == "none"
    assert decisions[0].name == "0.weight" and decisions[1].name == "2.weight"


def test_block_pruned_ffn_runs_tall_blocks():
    """A model pruned in 4 x 1 blocks is packed in 4 x 1 blocks (reported by explain) and
    still matches eager; the same model pruned weight by weight stays 1 x 1."""
    for block_rows in (4, 1):
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
        torch_sparsecpu.magnitude_prune_(model, 0.9, block_rows=block_rows)
        x = torch.randn(70, 64)
        with torch.inference_mode():
            assert_close_rel(torch.compile(model, backend="sparsecpu")(x), model(x))
        decisions = torch_sparsecpu.explain(model, x)
        assert [d.block_rows for d in decisions] == [block_rows, block_rows]
        assert ("4x1 blocks" in str(decisions[0])) == (block_rows == 4)
        torch._dynamo.reset()


def test_inner_eager_matches():
    model = ffn()
    x = torch.randn(7, 64)
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x))


class Mixed(nn.Module):
    """One layer of each kind the backend must leave alone, beside one it takes."""

    def __init__(self):
        super().__init__()
        self.sparse = nn.Linear(32, 32)
        self.dense = nn.Linear(32, 32)  # below min_sparsity
        self.fp64 = nn.Linear(32, 32).double()  # not float32
        self.tied = self.sparse  # the same weight twice: packed once

    def forward(self, x, runtime_weight):
        h = torch.relu(self.sparse(x))
        h = self.dense(h) + F.linear(h, runtime_weight)  # weight computed at run time
        h = self.tied(h)
        return self.fp64(h.double()).float()


def test_layers_not_taken_stay_as_they_were(caplog):
    model = Mixed().eval()
    with torch.no_grad():
        model.sparse.weight.mul_(torch.rand(32, 32) > 0.9)
        model.fp64.weight.mul_(torch.rand(32, 32) > 0.9)
    x, runtime_weight = torch.randn(5, 32), torch.randn(32, 32)
    with caplog.at_level(logging.DEBUG, logger="torch_sparsecpu"):
        decisions = torch_sparsecpu.explain(model, x, runtime_weight)
    taken = {(d.name, d.taken) for d in decisions}
    assert taken == {
        ("sparse.weight", True),
        ("dense.weight", False),
        ("fp64.weight", False),
        ("runtime_weight", False),
    }, taken
    reasons = {d.name: d.reason for d in decisions if not d.taken}
    assert "below min_sparsity" in reasons["dense.weight"]
    assert "float64" in reasons["fp64.weight"]
    assert "not a static parameter" in reasons["runtime_weight"]
    assert any("dense.weight" in r.message and "below min_sparsity" in r.message for r in caplog.records)
    compiled = torch.compile(model, backend="sparsecpu")
    with torch.no_grad():
        actual, calls = sparse_calls_in_inductor_code(compiled, x, runtime_weight)
        assert_close_rel(actual, model(x, runtime_weight))
    assert calls == 2  # self.sparse and self.tied


class BesideEmpty(nn.Module):
    """A layer whose weight has no elements, beside a sparse linear the backend takes (so
    that the graph is rewritten, not handed on as it was)."""

    def __init__(self, empty: nn.Module):
        super().__init__()
        self.empty = empty
        self.head = nn.Linear(32, 32)

    def forward(self, x, y):
        return self.empty(x), self.head(y)


@pytest.mark.parametrize(
    "empty,x",
    [
        (lambda: nn.Linear(0, 4), torch.randn(3, 0)),  # eager: the bias, [3, 4]
        (lambda: nn.Conv2d(0, 4, 3), torch.randn(2, 0, 5, 5)),  # eager: [2, 0, 3, 3]
    ],
    ids=["linear", "conv2d"],
)
def test_weight_without_elements_stays_dense(empty, x):
    """Issue #16 case 5: nn.Linear(0, 4) used to be taken and fail to pack ("cannot
    reshape tensor of 0 elements")."""
    model = BesideEmpty(empty()).eval()
    with torch.no_grad():
        model.empty.bias.copy_(torch.randn_like(model.empty.bias))
        model.head.weight.mul_(torch.rand_like(model.head.weight) > 0.9)
    y = torch.randn(3, 32)
    decisions = {d.name: d for d in torch_sparsecpu.explain(model, x, y)}
    assert not decisions["empty.weight"].taken and "no elements" in decisions["empty.weight"].reason
    assert decisions["head.weight"].taken
    with torch.no_grad():
        for actual, expected in zip(torch.compile(model, backend="sparsecpu")(x, y), model(x, y), strict=True):
            assert_close_rel(actual, expected)


class BroadcastBias(nn.Module):
    """F.linear with a sparse weight and a bias of shape [1] (eager broadcasts it), then a
    sparse linear the backend takes."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 32) * (torch.rand(16, 32) > 0.9))
        self.bias = nn.Parameter(torch.randn(1))
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(F.linear(x, self.weight, self.bias))


def test_bias_not_one_per_output_stays_dense():
    """Issue #16 case 5: a bias of shape [1] used to be taken sparse, then the op raised
    "bias must be float32 of shape [16]"."""
    model = BroadcastBias().eval()
    with torch.no_grad():
        model.head.weight.mul_(torch.rand(16, 16) > 0.9)
    x = torch.randn(3, 32)
    decisions = {d.name: d for d in torch_sparsecpu.explain(model, x)}
    assert not decisions["weight"].taken and "bias has shape [1]" in decisions["weight"].reason
    assert decisions["head.weight"].taken
    with torch.no_grad():
        assert_close_rel(torch.compile(model, backend="sparsecpu")(x), model(x))


def test_min_sparsity_option():
    model = ffn(sparsity=0.5)
    x = torch.randn(3, 64)
    assert not any(d.taken for d in torch_sparsecpu.explain(model, x))
    assert all(d.taken for d in torch_sparsecpu.explain(model, x, min_sparsity=0.4))
    assert not any(d.taken for d in torch_sparsecpu.explain(model, x, min_sparsity=1.0))


def test_fusion_can_be_turned_off():
    model = ffn()
    decisions = torch_sparsecpu.explain(model, torch.randn(3, 64), fuse_activations=False)
    assert [d.activation for d in decisions] == ["none", "none"]


def test_graph_without_sparse_layers_is_plain_inductor():
    model = ffn(sparsity=0.0)
    x = torch.randn(3, 64)
    compiled = torch.compile(model, backend="sparsecpu")
    with torch.no_grad():
        actual, calls = sparse_calls_in_inductor_code(compiled, x)
        assert calls == 0
        assert_close_rel(actual, model(x))


def test_compiled_graph_does_not_keep_first_input_alive():
    model = make_model()
    fast = compile_sparse(model, options=EAGER)
    x = torch.randn(512, 64)
    ref = weakref.ref(x)
    with torch.no_grad():
        fast(x)
    del x
    gc.collect()
    assert ref() is None, "the first call's input is still alive after the call"


def test_backend_found_without_importing_the_package():
    """The entry point alone makes backend="sparsecpu" work in a fresh interpreter."""
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        model = nn.Linear(64, 64).eval()
        with torch.no_grad():
            model.weight.mul_(torch.rand(64, 64) > 0.9)
        assert "torch_sparsecpu" not in sys.modules
        assert "sparsecpu" in torch._dynamo.list_backends()
        x = torch.randn(5, 64)
        with torch.no_grad():
            y = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})(x)
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        print("ok", "torch_sparsecpu" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok True"


@pytest.mark.parametrize("verbose", [False, True])
def test_each_layer_logged_once(caplog, verbose):
    model = ffn()
    level = logging.INFO if verbose else logging.DEBUG
    with caplog.at_level(logging.DEBUG, logger="torch_sparsecpu"):
        torch_sparsecpu.explain(model, torch.randn(3, 64), verbose=verbose)
    for name in ("0.weight", "2.weight"):
        lines = [r for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelno == level and lines[0].name == "torch_sparsecpu.backend"
