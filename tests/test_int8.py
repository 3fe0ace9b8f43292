"""int8 buffers (``pack_linear(quantize="int8")``): every kernel of every ISA equal to the
integer reference of tests/conftest.py (``int8_reference``) at tile edges, for 1 x 1 and
1 x 4 blocks; saturation extremes; the header and layout; edited weights; arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import torch_sparsecpu
from torch_sparsecpu import kernels, ops

from conftest import ACTIVATION_REFERENCE, int8_reference, quantize_rows_int8, sparse_weight

ISAS = kernels.available_isas()
HAS_VNNI = "avx512vnni" in "".join(kernels.kernel_names(ISAS[-1], "int8")) if "avx512" in ISAS else False


def wide_weight(out_features: int, in_features: int, block_sparsity: float, *, fill: float = 1.0) -> torch.Tensor:
    """A random weight whose nonzeros come in 1 x 4 blocks (features 4c .. 4c + 3 of one
    row): a ``block_sparsity`` fraction of the blocks is zero, each value of the others
    kept with probability ``fill``."""
    quads = (in_features + 3) // 4
    blocks = (torch.rand(out_features, quads, 1) >= block_sparsity).expand(-1, -1, 4).reshape(out_features, -1)
    kept = torch.rand(out_features, 4 * quads) < fill
    return (torch.randn(out_features, 4 * quads) * (blocks & kept))[:, :in_features].contiguous()


def assert_int8_exact(actual: torch.Tensor, expected: torch.Tensor, has_bias: bool, what: str) -> None:
    """Bitwise equal without a bias (one float rounding of an exact product); within 1 ulp
    of the float64 reference with one (its rounding is the fma's, but for a rare double
    rounding). An integer off by one misses by the product of the two scales, far more."""
    assert actual.shape == expected.shape, what
    if not has_bias:
        assert torch.equal(actual, expected), f"{what}: max diff {(actual - expected).abs().max().item():.3g}"
        return
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    diff = (actual - expected).abs()
    assert bool((diff <= ulp + 1e-38).all()), f"{what}: max diff {diff.max().item():.3g} beyond 1 ulp"


def run_int8(isa: str, x, weight, packed, bias=None, activation="none"):
    with torch_sparsecpu.force_isa(isa):
        return ops.linear(x, weight, packed, bias, activation)


def tile_token_counts(isa: str) -> list[int]:
    """1..40 tokens (every GEMV width, tiles of 8 and 16 and their neighbours) and two full
    panels plus 3."""
    return list(range(1, 41)) + [2 * kernels.max_panel_width(isa) + 3]


def test_kernel_names_int8():
    for isa in ISAS:
        names = kernels.kernel_names(isa, "int8")
        assert names and all(name.startswith(("spmm_qd8_f32_qc8w_1x", "spmv_qd8_f32_qc8w_1x")) for name in names), isa
        assert any("_1x4x" in name for name in names) and any("_1x1x" in name for name in names), isa
    with pytest.raises(ValueError, match="datatype"):
        kernels.kernel_names("scalar", "int4")


@pytest.mark.skipif(not HAS_VNNI, reason="the CPU has no AVX512-VNNI")
def test_avx512_runs_the_vnni_kernels():
    assert kernels.kernel_names("avx512", "int8")[-1] == "spmm_qd8_f32_qc8w_1x4x128__avx512vnni"
    assert kernels.kernel_names("avx2", "int8")[-1] == "spmm_qd8_f32_qc8w_1x4x64__avx2"


# (label, weight) pairs: in_features not a multiple of 4 nor of the K-block, rows fewer or
# more than a row block, empty rows, all-zero and dense weights.
def int8_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    empty_rows = wide_weight(37, 70, 0.7)
    empty_rows[::3] = 0
    return {
        "1x4 blocks 37x70": wide_weight(37, 70, 0.7),
        "half-filled 1x4 blocks 20x129": wide_weight(20, 129, 0.5, fill=0.5),
        "unstructured 33x67": sparse_weight(33, 67, 0.8),
        "one feature 9x1": sparse_weight(9, 1, 0.3),
        "three features 5x3": sparse_weight(5, 3, 0.2),
        "empty rows 37x70": empty_rows,
        "all zero 8x16": torch.zeros(8, 16),
        "dense 12x40": torch.randn(12, 40),
    }


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_cols", [1, 4])
def test_every_tile_and_edge_int8(isa, block_cols):
    """Each weight at every token count of tile_token_counts, with and without a bias, packed
    with K-blocks of 4 features, 8, 64 and one K-block, and row blocks of 5 and 128."""
    for (label, weight), (k_block, row_block) in itertools.product(
        int8_weights().items(), [(0, 128), (4, 5), (8, 128), (64, 5)]
    ):
        packed = ops.pack_linear(weight, quantize="int8", block_cols=block_cols, k_block=k_block, row_block=row_block)
        bias = torch.randn(weight.size(0))
        for tokens in tile_token_counts(isa):
            x = torch.randn(tokens, weight.size(1))
            what = f"{label} isa={isa} block_cols={block_cols} k_block={k_block} row_block={row_block} tokens={tokens}"
            assert_int8_exact(run_int8(isa, x, weight, packed), int8_reference(x, weight), False, what)
            assert_int8_exact(run_int8(isa, x, weight, packed, bias), int8_reference(x, weight, bias), True, what)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_activations_int8(isa, activation):
    """The activation applied to the dequantized sums: as close to the reference as the fp32
    kernels' activations are to PyTorch's (1e-5 of the largest pre-activation)."""
    weight = wide_weight(48, 96, 0.6)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4)
    bias = torch.randn(48)
    for tokens in (3, 8, 37):
        x = torch.randn(tokens, 96)
        pre = int8_reference(x, weight, bias)
        expected = ACTIVATION_REFERENCE[activation](pre.double()).float()
        actual = run_int8(isa, x, weight, packed, bias, activation)
        error = (actual - expected).abs().max().item()
        assert error <= 1e-5 * pre.abs().max().item(), f"isa={isa} act={activation} tokens={tokens}: {error:.3g}"


@pytest.mark.parametrize("isa", ISAS)
def test_saturation_extremes(isa):
    """Weights at +-127 and activations at the clamp limits (0 and 127, a token that is all
    its maximum or all its minimum): the 16-bit pair sums of vpmaddubsw reach 2 x 127 x 127
    without saturating, and the sums equal the reference's exactly."""
    in_features = 256
    weight = torch.full((16, in_features), 1.0)
    weight[1::2] = -1.0  # rows of +127 and of -127
    weight[4, ::2] = -1.0  # alternating signs
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4)
    q, _ = quantize_rows_int8(weight)
    assert int(q.abs().min()) == 127
    tokens = [
        torch.full((in_features,), 3.0),  # all at the top: q = 127, zero point 0
        torch.full((in_features,), -2.0),  # all at the bottom: q = 0, zero point 127
        torch.where(torch.arange(in_features) % 2 == 0, 5.0, -5.0),  # 127 and 0 alternating
        torch.zeros(in_features),
    ]
    x = torch.stack(tokens * 5)  # 20 tokens: panels of registers and a GEMV tail
    for count in (1, 2, 4, 20):
        actual = run_int8(isa, x[:count], weight, packed)
        assert_int8_exact(actual, int8_reference(x[:count], weight), False, f"isa={isa} tokens={count}")
    # Near the dense result: the alternating token's +-5 quantize to 4.96 and -5.04 (zero point 64).
    dense = F.linear(x, weight)
    assert (run_int8(isa, x, weight, packed) - dense).abs().max() <= 0.01 * dense.abs().max()


@pytest.mark.parametrize("isa", ISAS)
def test_zero_input_and_zero_rows(isa):
    """An all-zero input gives the bias exactly; rows of zeros give the bias."""
    weight = wide_weight(24, 40, 0.5)
    weight[5] = 0
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4)
    bias = torch.randn(24)
    for tokens in (1, 8, 19):
        y = run_int8(isa, torch.zeros(tokens, 40), weight, packed, bias)
        assert torch.equal(y, bias.expand(tokens, 24)), f"isa={isa} tokens={tokens}"
        y = run_int8(isa, torch.randn(tokens, 40), weight, packed, bias)
        assert torch.equal(y[:, 5], bias[5].expand(tokens)), f"isa={isa} tokens={tokens}"


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_tokens_give_nan_rows(isa):
    """A token holding a NaN or an infinity cannot be quantized: its outputs are NaN, the
    other tokens' are unchanged."""
    weight = wide_weight(16, 32, 0.5)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4)
    x = torch.randn(11, 32)
    x[2, 3], x[7, 0] = float("nan"), float("inf")
    y = run_int8(isa, x, weight, packed)
    assert bool(torch.isnan(y[[2, 7]]).all())
    keep = [t for t in range(11) if t not in (2, 7)]
    assert torch.equal(y[keep], int8_reference(x[keep], weight))


@pytest.mark.parametrize("isa", ISAS)
def test_layouts_int8(isa):
    """Transposed (feature-major), strided, 3-D and broadcast inputs quantize as a
    contiguous copy does."""
    weight = wide_weight(32, 64, 0.6)
    packed = ops.pack_linear(weight, quantize="int8")
    for x in (
        torch.randn(64, 19).T,  # feature-major
        torch.randn(21, 128)[:, ::2],  # feature stride 2
        torch.randn(3, 7, 64),
        torch.randn(64).expand(10, 64),
    ):
        expected = int8_reference(x.contiguous(), weight)
        assert torch.equal(run_int8(isa, x, weight, packed), expected), f"isa={isa} shape={tuple(x.shape)}"


def test_close_to_fp32():
    """The point of it all: int8 stays near the fp32 layer (per-row weights, per-token
    7-bit activations: about 1% of the output's scale on random data)."""
    weight = wide_weight(256, 512, 0.9)
    x = torch.randn(64, 512)
    y = ops.linear(x, weight, ops.pack_linear(weight, quantize="int8"))
    dense = F.linear(x, weight)
    assert (y - dense).abs().max().item() <= 0.03 * dense.abs().max().item()


def test_packed_header_int8():
    """The v4 layout of an int8 buffer: header, segments, scales, sums, int8 values four to
    a word, offsets of the first feature of each 1 x 4 block."""
    weight = wide_weight(10, 30, 0.6)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4, k_block=8, row_block=4)
    info = ops.packed_info(packed)
    quads = torch.nn.functional.pad(weight, (0, 2)).reshape(10, 8, 4).ne(0).any(2)
    blocks = int(quads.sum())
    assert (info.version, info.datatype, info.block_rows, info.block_cols) == (4, "int8", 1, 4)
    assert (info.k_block, info.num_k_blocks, info.nnz) == (8, 4, 4 * blocks)
    segments = 10 * 4
    values = 16 + 2 * segments + 1
    assert packed.numel() == values + 2 * 10 + math.ceil(4 * blocks / 4) + math.ceil(blocks / 2)
    q, scale = quantize_rows_int8(weight)
    assert torch.equal(packed[values : values + 10].view(torch.float32), scale)
    assert torch.equal(packed[values + 10 : values + 20], q.sum(1).to(torch.int32))
    stored = packed[values + 20 : values + 20 + blocks].view(torch.int8)
    assert torch.equal(stored[stored != 0].sort().values, q[q != 0].to(torch.int8).sort().values)
    offsets = packed[values + 20 + blocks :].view(torch.int16)[:blocks]
    assert bool((offsets % 4 == 0).all()) and bool((offsets < 8).all())


def test_default_block_cols_and_k_block():
    assert ops.default_block_cols(wide_weight(64, 128, 0.9)) == 4
    assert ops.default_block_cols(sparse_weight(64, 128, 0.9)) == 1
    weight = wide_weight(64, 1024, 0.9)
    wider = ops.INT8_K_BLOCK_FACTOR * ops.default_k_block(weight, block_cols=4)
    assert ops.default_k_block(weight, quantize="int8", block_cols=4) == wider
    assert ops.default_k_block(sparse_weight(64, 4096, 0.99), quantize="int8", block_cols=1) == 256
    assert ops.packed_info(ops.pack_linear(weight, quantize="int8")).block_cols == 4


@pytest.mark.parametrize("isa", ISAS)
def test_edited_weight_is_repacked_as_int8(isa):
    """A weight edited after packing runs a buffer packed again as int8 with the same
    block shape (the repack quantizes the new values)."""
    weight = wide_weight(16, 64, 0.5)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4, k_block=16)
    x = torch.randn(9, 64)
    run_int8(isa, x, weight, packed)  # first use binds the buffer to the weight
    with torch.no_grad():
        weight.mul_(-3.0)
        weight[:, :8] = 0.0
    assert torch.equal(run_int8(isa, x, weight, packed), int8_reference(x, weight))


def test_bad_arguments_int8():
    weight = wide_weight(8, 16, 0.5)
    cases = [
        (ValueError, "quantize", lambda: ops.pack_linear(weight, quantize="int4")),
        (TypeError, "quantize", lambda: ops.pack_linear(weight, quantize=8)),
        (ValueError, "block_cols", lambda: ops.pack_linear(weight, quantize="int8", block_cols=2)),
        (ValueError, "block_cols", lambda: ops.pack_linear(weight, block_cols=4)),
        (TypeError, "block_cols", lambda: ops.pack_linear(weight, quantize="int8", block_cols="4")),
        (ValueError, "block_rows", lambda: ops.pack_linear(weight, quantize="int8", block_rows=4)),
        (ValueError, "k_block", lambda: ops.pack_linear(weight, quantize="int8", k_block=6)),
        (ValueError, "weight", lambda: ops.pack_linear(weight.masked_fill(weight != 0, float("nan")), quantize="int8")),
        (ValueError, "input features", lambda: ops.pack_linear(torch.zeros(1, 131073), quantize="int8")),
        (ValueError, "quantize", lambda: torch.ops.sparsecpu.pack_linear(weight, 0, 8, 1, "int4", 1)),
        (ValueError, "block_cols", lambda: torch.ops.sparsecpu.pack_linear(weight, 0, 8, 1, "int8", 3)),
        (ValueError, "block_cols", lambda: torch.ops.sparsecpu.pack_linear(weight, 0, 8, 1, None, 4)),
        (ValueError, "k_block", lambda: torch.ops.sparsecpu.pack_linear(weight, 6, 8, 1, "int8", 4)),
        (ValueError, "finite", lambda: torch.ops.sparsecpu.pack_linear(weight / 0.0, 0, 8, 1, "int8", 4)),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()


def test_old_version_refused_with_repack_message():
    """A buffer of format version 3 (before int8) is refused, telling to repack."""
    weight = sparse_weight(8, 16, 0.5)
    packed = ops.pack_linear(weight)
    packed[ops.HEADER_FIELDS["version"]] = 3
    with pytest.raises(ValueError, match="format version 3, this build reads version 4; repack"):
        ops.linear(torch.randn(2, 16), weight, packed)


def test_opcheck_int8():
    weight = wide_weight(9, 20, 0.5)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4)
    torch.library.opcheck(torch.ops.sparsecpu.pack_linear.default, (weight, 8, 4, 1, "int8", 4))
    for tokens in (3, 17):
        args = (torch.randn(tokens, 20), weight, packed, torch.randn(9), "gelu")
        torch.library.opcheck(torch.ops.sparsecpu.linear.default, args)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_chain_int8(isa):
    """A chain of int8 layers equals the same layers run one by one (bitwise: exact sums,
    the same epilogue whatever the panel width); with an fp32 layer in it, within that
    layer's rounding."""
    widths = [70, 96, 40, 24]
    weights = [wide_weight(widths[i + 1], widths[i], 0.6) for i in range(3)]
    biases = [torch.randn(n) for n in widths[1:]]
    acts = ["gelu", "relu", "none"]
    for quantized in ([True, True, True], [True, False, True], [False, True, False]):
        packed = [ops.pack_linear(w, quantize="int8" if q else None) for w, q in zip(weights, quantized, strict=True)]
        for tokens in (1, 5, 8, 37, 133):
            x = torch.randn(tokens, widths[0])
            with torch_sparsecpu.force_isa(isa):
                y = ops.linear_chain(x, weights, packed, biases, acts)
                expected = x
                for w, p, b, a in zip(weights, packed, biases, acts, strict=True):
                    expected = ops.linear(expected, w, p, b, a)
            what = f"isa={isa} int8 layers={quantized} tokens={tokens}"
            if all(quantized):
                assert torch.equal(y, expected), what
            else:
                assert (y - expected).abs().max() <= 1e-4 * expected.abs().max(), what


@pytest.mark.parametrize("isa", ISAS)
def test_conv2d_int8(isa):
    """A convolution with an int8 buffer: each output pixel's features (channel, kernel
    row, kernel column, zero padding included) quantized as one token, for the 1 x 1
    (strided, channels-last) and k x k paths."""
    torch.manual_seed(3)
    geometries = ((1, 1, 0, False), (1, 2, 0, True), (3, 1, 1, False), (3, 2, 1, True))
    for kernel, stride, padding, channels_last in geometries:
        weight = torch.randn(24, 8, kernel, kernel) * (torch.rand(24, 8, kernel, kernel) > 0.5)
        packed = ops.pack_linear(weight.flatten(1), quantize="int8", block_cols=4)
        x = torch.randn(2, 8, 9, 7)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch_sparsecpu.force_isa(isa):
            y = ops.conv2d(x, weight, packed, stride=stride, padding=padding)
        columns = F.unfold(x, kernel, padding=padding, stride=stride)  # [batch, features, pixels]
        expected = int8_reference(columns.transpose(1, 2), weight.flatten(1)).transpose(1, 2).reshape(y.shape)
        assert torch.equal(y.contiguous(), expected), f"isa={isa} kernel={kernel} stride={stride} {channels_last=}"


def test_autograd_of_an_int8_buffer_is_the_fp32_layers():
    """Gradients flow through the fp32 weight, as for an fp32 buffer: grad_input = grad @ W,
    grad_weight = grad^T x (the forward is the int8 one)."""
    weight = wide_weight(16, 32, 0.5).requires_grad_()
    packed = ops.pack_linear(weight.detach(), quantize="int8")
    x = torch.randn(5, 32, requires_grad=True)
    grad = torch.randn(5, 16)
    y = ops.linear(x, weight, packed)
    assert torch.equal(y.detach(), int8_reference(x.detach(), weight.detach()))
    y.backward(grad)
    assert torch.allclose(x.grad, grad @ weight.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(weight.grad, grad.T @ x.detach(), rtol=1e-5, atol=1e-6)


def test_magnitude_prune_in_1x4_blocks():
    """block_cols=4: the sparsity fraction of 1 x 4 blocks (4 consecutive input features of
    a row) with the smallest L2 norm become zero, whole; a layer whose input count is not a
    multiple of 4 is pruned weight by weight; the result packs as 1 x 4 int8 blocks."""
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 6), torch.nn.Linear(6, 8))
    before = [layer.weight.detach().clone() for layer in model]
    torch_sparsecpu.magnitude_prune_(model, 0.75, block_cols=4)
    for layer, original in zip(model, before, strict=True):
        cols = 4 if original.size(1) % 4 == 0 else 1
        norms = original.reshape(original.size(0), -1, cols).norm(dim=2)
        zero = layer.weight.detach().reshape(original.size(0), -1, cols).eq(0).all(dim=2)
        assert int(zero.sum()) == round(0.75 * zero.numel())
        assert norms[zero].max() <= norms[~zero].min()
    assert ops.default_block_cols(model[0].weight.detach()) == 4
    assert ops.packed_info(ops.pack_linear(model[0].weight.detach(), quantize="int8")).block_cols == 4
    with pytest.raises(ValueError, match="block_cols"):
        torch_sparsecpu.magnitude_prune_(model, 0.5, block_cols=2)
    with pytest.raises(ValueError, match="one block shape"):
        torch_sparsecpu.magnitude_prune_(model, 0.5, block_rows=4, block_cols=4)
    with pytest.raises(TypeError, match="block_cols"):
        torch_sparsecpu.magnitude_prune_(model, 0.5, block_cols=4.0)
