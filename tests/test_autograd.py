"""Autograd through a compiled model: outputs, input and parameter gradients against the
eager dense model (within 1e-4 relative), with every or only some leaves requiring grad,
and after an inference call compiled a fused chain. The ops' own gradients are checked
in test_ops.py, convolutions' in test_conv.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import EAGER, assert_close_rel, compile_sparse, make_model, sparse_op_calls

ACTS = {
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
}


def _check_autograd(act_name: str, inner: str, grads: str = "all"):
    model = make_model(ACTS[act_name]()).train()
    dense = copy.deepcopy(model)
    if grads == "input":
        for m in (model, dense):
            m.requires_grad_(False)
    options = {"inner": inner}
    fast = compile_sparse(model, options=options)

    x = torch.randn(3, 5, 64, requires_grad=grads != "params")
    x_dense = x.detach().clone().requires_grad_(grads != "params")
    grad_out = torch.randn(3, 5, 32)

    y, calls = sparse_op_calls(fast, x)
    assert calls >= 2, "sparse path not taken under autograd"
    y_dense = dense(x_dense)
    assert_close_rel(y, y_dense, rel=1e-4, what="output")
    y.backward(grad_out)
    y_dense.backward(grad_out)
    if grads != "params":
        assert_close_rel(x.grad, x_dense.grad, rel=1e-4, what="input.grad")
    if grads != "input":
        for (name, p), p_dense in zip(model.named_parameters(), dense.parameters(), strict=True):
            assert p.grad is not None, f"{name}.grad missing"
            assert_close_rel(p.grad, p_dense.grad, rel=1e-4, what=f"{name}.grad")


@pytest.mark.parametrize("act", list(ACTS))
def test_autograd_eager_inner(act):
    _check_autograd(act, "eager")


@pytest.mark.parametrize("grads", ["input", "params"])
def test_autograd_partial_requires_grad(grads):
    _check_autograd("gelu", "eager", grads)


def test_autograd_inductor():
    _check_autograd("silu", "inductor")


def test_autograd_after_inference_compile():
    """Chains of sparse layers are fused only for inference and the chain op has no
    autograd formula: a call with grad on, after an inference call, must still be right."""
    model = make_model(nn.GELU()).train()
    dense = copy.deepcopy(model)
    fast = compile_sparse(model, options=EAGER)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_close_rel(fast(x), dense(x), what="inference call")
    x.requires_grad_()
    x_dense = x.detach().clone().requires_grad_()
    y, y_dense = fast(x), dense(x_dense)
    assert y.requires_grad
    assert_close_rel(y, y_dense, rel=1e-4, what="output with grad")
    y.sum().backward()
    y_dense.sum().backward()
    assert_close_rel(x.grad, x_dense.grad, rel=1e-4, what="input.grad")
    for (name, p), p_dense in zip(model.named_parameters(), dense.parameters(), strict=True):
        assert_close_rel(p.grad, p_dense.grad, rel=1e-4, what=f"{name}.grad")
    with torch.no_grad():  # and back to inference
        assert_close_rel(fast(x), dense(x), what="inference call after the grad call")
