"""Dtypes other than float32: layers in float64, bfloat16 or float16, and models run under
autocast, stay dense (the kernels are fp32-only) with the reason logged and reported by
explain(); float32 layers of the same model take the sparse path."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import torch_sparsecpu

from conftest import EAGER, SPARSITY, assert_close_rel, compile_sparse, make_model, sparse_op_calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_non_fp32_dtypes_stay_dense(dtype, caplog):
    model = make_model(dtype=dtype)
    x = torch.randn(4, 7, 64, dtype=dtype)
    caplog.set_level(logging.DEBUG, logger="torch_sparsecpu")
    fast = compile_sparse(model, options=EAGER)
    with torch.no_grad():
        y, calls = sparse_op_calls(fast, x)
        expected = model(x)
    assert calls == 0
    assert y.dtype == dtype
    assert_close_rel(y, expected, rel=1e-5 if dtype == torch.float64 else 1e-2)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("torch_sparsecpu")]
    assert any("dense" in m and str(dtype) in m for m in messages), messages

    decisions = torch_sparsecpu.explain(model, x)
    assert len(decisions) == 2
    assert all(not d.taken for d in decisions), decisions
    assert all(str(dtype) in d.reason for d in decisions), decisions


def test_fp32_explain_takes_sparse_path(caplog):
    model = make_model()
    caplog.set_level(logging.DEBUG, logger="torch_sparsecpu")
    decisions = torch_sparsecpu.explain(model, torch.randn(4, 64))
    assert [d.taken for d in decisions] == [True, True], decisions
    assert decisions[0].activation == "relu"
    assert all(abs(d.sparsity - SPARSITY) < 0.01 for d in decisions)
    assert any("sparse" in r.getMessage() for r in caplog.records if r.name.startswith("torch_sparsecpu"))


def test_autocast_inside_forward_stays_dense(caplog):
    model = make_model()

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    caplog.set_level(logging.DEBUG, logger="torch_sparsecpu")
    x = torch.randn(4, 64)
    with torch.no_grad():
        y, calls = sparse_op_calls(compile_sparse(fn, options=EAGER), x)
        expected = fn(x)
    assert calls == 0
    assert y.dtype == expected.dtype == torch.bfloat16
    assert_close_rel(y, expected, rel=1e-2)
    assert any("autocast" in r.getMessage() for r in caplog.records if r.name.startswith("torch_sparsecpu"))


@pytest.mark.parametrize("inner", ["eager"])
def test_autocast_outside_compiled_model(inner):
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    torch_sparsecpu.magnitude_prune_(model, SPARSITY)
    fast = compile_sparse(model, options={"inner": inner})
    x = torch.randn(4, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
        expected = model(x)
    assert y.dtype == expected.dtype, f"compiled gives {y.dtype}, eager gives {expected.dtype}"
    assert_close_rel(y, expected, rel=1e-2)
