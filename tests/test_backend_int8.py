"""The backend's ``options={"quantize": "int8"}``: which layers go int8 (``ops.int8_pays``),
what ``explain`` says, and that the compiled model stays close to eager fp32; the default
(None) keeps every layer fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_sparsecpu
from torch_sparsecpu import ops

from conftest import EAGER, compile_sparse, sparse_op_calls


def ffn(block_cols: int, seed: int = 0) -> nn.Sequential:
    """768 -> 3072 -> GELU -> 768 at 90%, pruned in 1 x 4 blocks or weight by weight."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    return torch_sparsecpu.magnitude_prune_(model, 0.9, block_cols=block_cols).eval()


def int8_decisions(model, x, **options):
    return [d.datatype for d in torch_sparsecpu.explain(model, x, **options) if d.taken]


def test_int8_pays_rule():
    """1 x 4 blocks at least half filled: int8 at any token count; zeros anywhere: only for
    calls of at most MAX_GEMV_TOKENS tokens."""
    wide, loose = ffn(4)[0].weight.detach(), ffn(1)[0].weight.detach()
    assert ops.int8_pays(wide) and ops.int8_pays(wide, 128)
    assert not ops.int8_pays(loose) and not ops.int8_pays(loose, 128)
    assert ops.int8_pays(loose, 1) and ops.int8_pays(loose, ops.MAX_GEMV_TOKENS)
    assert not ops.int8_pays(loose, ops.MAX_GEMV_TOKENS + 1)


def test_default_is_fp32_and_quantize_int8_takes_1x4_layers():
    model, x = ffn(4), torch.randn(2, 40, 256)
    assert int8_decisions(model, x) == ["f32", "f32"]
    assert int8_decisions(model, x, quantize="int8") == ["int8", "int8"]
    decision = torch_sparsecpu.explain(model, x, quantize="int8")[0]
    assert "int8" in str(decision) and decision.datatype == "int8"
    assert int8_decisions(ffn(1), x, quantize="int8") == ["f32", "f32"]  # zeros anywhere, 80 tokens
    assert int8_decisions(ffn(1), torch.randn(1, 1, 256), quantize="int8") == ["int8", "int8"]  # decoding


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_int8_model_stays_close_to_eager(inner):
    model, x = ffn(4), torch.randn(3, 50, 256)
    expected = model(x)
    fast = compile_sparse(model, options={"quantize": "int8", "inner": inner})
    with torch.inference_mode():
        y, layers = sparse_op_calls(fast, x)
    assert layers >= 2  # (a lower bound: Inductor's extern call may count twice)
    assert (y - expected).abs().max() <= 0.03 * expected.abs().max()


def test_quantize_option_is_checked():
    with pytest.raises(ValueError, match="quantize"):
        torch_sparsecpu.SparseCPUOptions.from_mapping({"quantize": "int4"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="option 'quantize' must be None or one of"):
        compile_sparse(ffn(4), options={**EAGER, "quantize": "fp16"})(torch.randn(2, 256))
