"""Every kernel of every ISA this CPU has, against the dense reference; the packed
header; chains of layers, long ones included."""

from __future__ import annotations

import dataclasses
import itertools
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_sparsecpu
from torch_sparsecpu import kernels, ops
from torch_sparsecpu.kernels import torch_threads

from conftest import ACTIVATION_REFERENCE, assert_close_rel, run_child, sparse_weight, tall_weight

ISAS = kernels.available_isas()
FEATURES = (1, 7, 64, 768, 3072)
TOKENS = (1, 3, 8, 33, 128)
SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)


def reference(x, weight, bias, activation):
    """The dense result, computed in float64 and rounded once to float32."""
    dense = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return ACTIVATION_REFERENCE[activation](dense).float()


def pre_activation_scale(x, weight, bias) -> float:
    """max |x W^T + b|: the scale of the rounding an activation's tail may magnify."""
    pre = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return pre.abs().max().item() if pre.numel() else 0.0


def check_linear(x, weight, bias, activation, *, isa, what, **pack_args):
    packed = ops.pack_linear(weight, **pack_args)
    expected = reference(x, weight, bias, activation)
    with torch_sparsecpu.force_isa(isa):
        actual = ops.linear(x, weight, packed, bias, activation)
    assert_close_rel(
        actual,
        expected,
        what=f"{what} isa={isa} act={activation}",
        scale=max(pre_activation_scale(x, weight, bias), expected.abs().max().item() if expected.numel() else 0),
    )


def test_isas_listed():
    assert "scalar" in ISAS
    assert kernels.isa() in ISAS
    for isa in ISAS:
        assert kernels.kernel_names(isa), isa


def test_vec16_runs_everywhere_with_the_avx512_tiles_but_is_never_the_default():
    """vec16 (portable 16-lane vectors) is there so every test of an ISA runs the width-16
    kernel logic of the AVX-512 table on any CPU: same tiles, same panel width."""
    assert "vec16" in ISAS
    assert kernels.max_panel_width("vec16") == kernels.max_panel_width("avx512") == 128
    assert [n.replace("__vec16", "") for n in kernels.kernel_names("vec16")] == [
        n.replace("__avx512", "") for n in kernels.kernel_names("avx512")
    ]
    # The default, chosen at import without TORCH_SPARSECPU_ISA: the last real ISA available.
    out = run_child(
        "import os; os.environ.pop('TORCH_SPARSECPU_ISA', None)\n"
        "import torch_sparsecpu as t; print(t.isa(), ','.join(t.available_isas()))"
    )
    default, available = out.split()
    assert default == [isa for isa in available.split(",") if isa != "vec16"][-1], out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("in_features,out_features", list(itertools.product(FEATURES, FEATURES)))
def test_linear_sweep(isa, in_features, out_features):
    """in/out features x tokens x sparsity; every activation with a bias, none without."""
    for sparsity in SPARSITIES:
        weight = sparse_weight(out_features, in_features, sparsity)
        packed = ops.pack_linear(weight)
        bias = torch.randn(out_features)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            dense = F.linear(x.double(), weight.double())
            cases = [(None, "none")] + [(bias, act) for act in ACTIVATION_REFERENCE]
            for b, activation in cases:
                pre = dense if b is None else dense + b.double()
                expected = ACTIVATION_REFERENCE[activation](pre).float()
                with torch_sparsecpu.force_isa(isa):
                    actual = ops.linear(x, weight, packed, b, activation)
                scale = pre.abs().max().item() if pre.numel() else 0.0
                assert_close_rel(
                    actual,
                    expected,
                    scale=scale,
                    what=(
                        f"[{out_features}x{in_features}] sparsity={sparsity} tokens={tokens} "
                        f"bias={b is not None} act={activation} isa={isa}"
                    ),
                )


def _tile_widths(isa):
    """Token counts of every register tile (from the kernel list), e.g. 1..7 (GEMV),
    8..64 (1-row tiles) and 8..24 (4-row strips) for avx2."""
    names = kernels.kernel_names(isa)
    if names[0] == f"spmm_f32_1xN__{isa}":
        return [1, 5, 64]
    return sorted({int(re.fullmatch(r"sp(?:mm|mv)_f32_\d+x(\d+)__\w+", name)[1]) for name in names})


def check_every_tile_and_edge(isa, weights, blockings, **pack_args):
    """Each weight at NR - 1, NR and NR + 1 tokens for every tile NR of the ISA (and two
    full panels + 3), packed with each (k_block, row_block), with bias and fused GELU (a
    pass over the stored row) and ReLU6 (applied on the store, clamped on both sides)."""
    widths = _tile_widths(isa)
    panel = kernels.max_panel_width(isa)
    token_counts = sorted({n for w in widths for n in (w - 1, w, w + 1) if n > 0} | {panel * 2 + 3})
    for (label, weight), tokens in itertools.product(weights.items(), token_counts):
        x = torch.randn(tokens, weight.shape[1])
        bias = torch.randn(weight.shape[0])
        for (k_block, row_block), activation in itertools.product(blockings, ("gelu", "relu6")):
            check_linear(
                x,
                weight,
                bias,
                activation,
                isa=isa,
                k_block=k_block,
                row_block=row_block,
                **pack_args,
                what=f"{label} tokens={tokens} k_block={k_block} row_block={row_block} {pack_args}",
            )


@pytest.mark.parametrize("isa", ISAS)
def test_every_tile_and_edge(isa):
    """Each tile at n = NR, NR - 1 and NR + 1 tokens; rows fewer / more than a row block;
    k = 1; empty rows; all-zero and fully dense weights; K- and row-block edges."""
    weights = {
        "k=1": sparse_weight(37, 1, 0.5),
        "rows<block": sparse_weight(3, 50, 0.7),
        "rows>block": sparse_weight(70, 50, 0.7),
        "empty rows": torch.cat([torch.zeros(5, 40), sparse_weight(6, 40, 0.5), torch.zeros(9, 40)]),
        "all zero": torch.zeros(33, 20),
        "dense": torch.randn(33, 20),
    }
    check_every_tile_and_edge(isa, weights, ((0, 32), (1, 1), (7, 5), (128, 64)))


@pytest.mark.parametrize("isa", ISAS)
def test_tall_blocks_every_tile_and_edge(isa):
    """4 x 1 blocks (block_rows=4): the same edges with full and half-filled blocks, every
    panel width (strips of 4-row tiles and their remainders)."""
    weights = {
        "k=1": tall_weight(36, 1, 0.5),
        "rows<block": tall_weight(4, 50, 0.7),
        "rows>block": tall_weight(72, 50, 0.7),
        "empty rows": torch.cat([torch.zeros(8, 40), tall_weight(8, 40, 0.5), torch.zeros(12, 40)]),
        "half-filled blocks": tall_weight(40, 60, 0.6, fill=0.5),
        "all zero": torch.zeros(32, 20),
        "dense": torch.randn(32, 20),
    }
    check_every_tile_and_edge(isa, weights, ((0, 32), (1, 4), (7, 8), (128, 64)), block_rows=4)


@pytest.mark.parametrize("shape", [(64, 128), (30, 7), (1, 5), (0, 4), (4, 0)])
def test_nonzero_counts(shape):
    """The one-pass C++ count the packing defaults use equals torch's: nonzeros, and
    4 x 1 blocks holding one (the rows past the last whole block in none); any strides."""
    weight = tall_weight(64, 128, 0.7, fill=0.6)[: shape[0], : shape[1]].contiguous()
    whole = shape[0] // 4 * 4
    blocks = weight[:whole].reshape(whole // 4, 4, shape[1]).ne(0).any(dim=1)
    expected = (int(torch.count_nonzero(weight)), int(blocks.sum()))
    assert ops.nonzero_counts(weight) == expected
    assert ops.nonzero_counts(weight.t().contiguous().t()) == expected  # column-major
    assert ops.nonzero_counts(weight.double()) == expected


def test_default_block_rows():
    """4 x 1 blocks where the weight has them, filled at least TALL_BLOCK_MIN_FILL (80%);
    1 x 1 otherwise."""
    assert ops.TALL_BLOCK_MIN_FILL == 0.8
    assert ops.default_block_rows(tall_weight(64, 128, 0.9)) == 4
    assert ops.default_block_rows(tall_weight(64, 128, 0.9, fill=0.92)) == 4
    assert ops.default_block_rows(tall_weight(64, 128, 0.9, fill=0.68)) == 1
    assert ops.default_block_rows(tall_weight(64, 128, 0.9, fill=0.45)) == 1
    assert ops.default_block_rows(sparse_weight(64, 128, 0.9)) == 1  # unstructured: 29% filled
    assert ops.default_block_rows(torch.randn(30, 8)) == 1  # rows not a multiple of 4
    assert ops.default_block_rows(torch.zeros(64, 8)) == 1
    eight_by_one = tall_weight(64, 128, 0.9).reshape(8, 8, 128)[:, :4].repeat_interleave(2, 0).reshape(64, 128)
    assert ops.default_block_rows(eight_by_one) == 4  # 8 x 1 blocks are two 4 x 1 blocks
    tall = tall_weight(64, 128, 0.9)
    assert int(ops.pack_linear(tall)[9]) == 4
    assert int(ops.pack_linear(tall, row_block=6)[9]) == 1  # 4 does not divide row_block
    assert int(ops.pack_linear(tall, block_rows=1)[9]) == 1


@pytest.mark.parametrize("isa", ISAS)
def test_input_layouts(isa):
    """Any rank [..., in_features], any strides; the output is contiguous."""
    weight = sparse_weight(48, 40, 0.8)
    bias = torch.randn(48)
    inputs = {
        "3-D": torch.randn(2, 9, 40),
        "transposed": torch.randn(40, 19).t(),
        "sliced": torch.randn(30, 80)[::2, ::2],
        "expanded": torch.randn(1, 40).expand(11, 40),
        "1-D": torch.randn(40),
        "empty": torch.randn(0, 40),
        "empty 3-D": torch.randn(3, 0, 40),
    }
    packed = ops.pack_linear(weight)
    for label, x in inputs.items():
        with torch_sparsecpu.force_isa(isa):
            actual = ops.linear(x, weight, packed, bias, "relu")
        assert actual.is_contiguous(), label
        assert_close_rel(
            actual, reference(x, weight, bias, "relu"), what=label, scale=pre_activation_scale(x, weight, bias)
        )


def test_packed_header():
    weight = sparse_weight(70, 300, 0.9)
    packed = ops.pack_linear(weight, k_block=128, row_block=32)
    nnz = int(torch.count_nonzero(weight))
    # version, out, in, k_block, K-blocks, row_block, row blocks, nnz, block_rows, datatype, block_cols
    assert dataclasses.astuple(ops.packed_info(packed)) == (4, 70, 300, 128, 3, 32, 3, nnz, 1, "f32", 1)
    segments = 70 * 3
    assert packed.numel() == 16 + 2 * segments + 1 + nnz + (nnz + 1) // 2
    # The values of the packed buffer are exactly the nonzeros of the weight.
    values = packed[16 + 2 * segments + 1 : 16 + 2 * segments + 1 + nnz].view(torch.float32)
    assert torch.equal(values.sort().values, weight[weight != 0].sort().values)


def test_packed_header_tall_blocks():
    """block_rows=4: one segment per 4-row group and K-block, one offset per block, the
    4 values of each block stored together, zeros inside a block included."""
    weight = tall_weight(72, 300, 0.8, fill=0.75)
    packed = ops.pack_linear(weight, k_block=128, row_block=32, block_rows=4)
    blocks = int(weight.reshape(18, 4, 300).ne(0).any(1).sum())
    assert dataclasses.astuple(ops.packed_info(packed)) == (4, 72, 300, 128, 3, 32, 3, 4 * blocks, 4, "f32", 1)
    segments = 72 // 4 * 3
    assert packed.numel() == 16 + 2 * segments + 1 + 4 * blocks + (blocks + 1) // 2
    seg_rows = packed[16 + segments + 1 : 16 + 2 * segments + 1]
    assert bool((seg_rows % 4 == 0).all()) and bool((seg_rows < 32).all())
    values = packed[16 + 2 * segments + 1 : 16 + 2 * segments + 1 + 4 * blocks].view(torch.float32)
    assert int((values == 0).sum()) == 4 * blocks - int(torch.count_nonzero(weight))
    assert torch.equal(values[values != 0].sort().values, weight[weight != 0].sort().values)


def test_negative_zero_and_nan_weights():
    """-0.0 is a zero; NaN is a nonzero and propagates like the dense result."""
    weight = torch.tensor([[-0.0, 1.0], [float("nan"), 2.0]])
    packed = ops.pack_linear(weight)
    assert ops.packed_info(packed).nnz == 3
    y = ops.linear(torch.ones(1, 2), weight, packed)
    assert y[0, 0].item() == 1.0 and torch.isnan(y[0, 1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_large_panels_packed_per_slice(isa, layout):
    """Panels over 256 KiB (1300 features x >= 56 tokens) are packed one K-block slice at
    a time by each thread that uses them: contiguous and strided inputs, a K-block that
    does not divide the features, a narrower last panel, one and two threads."""
    weight = sparse_weight(80, 1300, 0.9)
    bias = torch.randn(80)
    for tokens in (56, 64, 130):
        x = torch.randn(tokens, 1300) if layout == "contiguous" else torch.randn(1300, tokens).T
        for threads in (1, 2):
            with torch_threads(threads):
                check_linear(
                    x,
                    weight,
                    bias,
                    "relu",
                    isa=isa,
                    k_block=96,
                    row_block=16,
                    what=f"{layout} tokens={tokens} threads={threads}",
                )


def _chain_reference(x, weights, biases, activations):
    """The layers of a chain one after the other in float64."""
    y = x.double()
    for w, b, a in zip(weights, biases, activations, strict=True):
        y = ACTIVATION_REFERENCE[a](F.linear(y, w.double(), None if b is None else b.double()))
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("second_k_block", [32, 100, 0])
def test_linear_chain_pipelined_pair(isa, second_k_block):
    """A second layer with more than 256 KiB of input panel (1100 features x >= 64 tokens)
    and a small output runs pipelined behind the first (run_layer_pair): its K-blocks
    start as soon as the first layer's finished rows cover them, whether or not K-block
    edges line up with the first layer's row groups. A third layer follows the pair."""
    features = (48, 1100, 40, 24)
    weights = [sparse_weight(o, i, 0.8) for i, o in zip(features, features[1:], strict=False)]
    biases = [torch.randn(w.shape[0]) for w in weights]
    acts = ["gelu", "relu", "none"]
    packed = [
        ops.pack_linear(weights[0], k_block=32, row_block=16),
        ops.pack_linear(weights[1], k_block=second_k_block, row_block=16),
        ops.pack_linear(weights[2]),
    ]
    for tokens in (5, 64, 130):  # a GEMV panel (not pipelined), one panel, panels on both threads
        x = torch.randn(tokens, features[0])
        expected = _chain_reference(x, weights, biases, acts)
        with torch_sparsecpu.force_isa(isa):
            actual = ops.linear_chain(x, weights, packed, biases, acts)
        scale = max(expected.abs().max().item(), 1.0)
        assert_close_rel(actual, expected.float(), what=f"pipelined chain tokens={tokens}", scale=scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_chain_matches_layer_by_layer(isa, threads):
    """Tensor columns: chains of 1-3 layers over token counts around the panel sizes
    (GEMV panels, padded panels, more panels than threads and fewer)."""
    shapes = [(40, 96, 40), (7, 300, 33, 5), (64, 64)]
    activations = ["gelu", "relu", "silu", "gelu_tanh", "none"]
    with torch_threads(threads):
        for features in shapes:
            weights = [
                sparse_weight(o, i, s) for i, o, s in zip(features, features[1:], (0.9, 0.5, 0.99), strict=False)
            ]
            biases = [torch.randn(w.shape[0]) if n % 2 == 0 else None for n, w in enumerate(weights)]
            acts = activations[: len(weights)]
            packed = [ops.pack_linear(w, k_block=32, row_block=16) for w in weights]
            for tokens in (1, 3, 7, 8, 9, 33, 64, 65, 130):
                x = torch.randn(tokens, features[0])
                expected = _chain_reference(x, weights, biases, acts)
                with torch_sparsecpu.force_isa(isa):
                    actual = ops.linear_chain(x, weights, packed, biases, acts)
                scale = max(expected.abs().max().item(), 1.0)
                assert_close_rel(actual, expected.float(), what=f"chain {features} tokens={tokens}", scale=scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_rows", [1, 4])
def test_linear_chain_equals_separate_ops(isa, block_rows):
    """The 3-layer MLP's chain (GELU, ReLU, none; a wide middle layer), scaled down, at 90%:
    fused equals the same layers as separate linear ops within 1e-5 relative, with more
    tokens than the chain's 64-token panels on one and two threads (full panels, a padded
    one, a GEMV remainder), and a float64 reference."""
    features = (96, 384, 384, 96)
    make = sparse_weight if block_rows == 1 else tall_weight
    weights = [make(o, i, 0.9) for i, o in zip(features, features[1:], strict=False)]
    biases = [torch.randn(w.shape[0]) for w in weights]
    acts = ["gelu", "relu", "none"]
    packed = [ops.pack_linear(w, block_rows=block_rows) for w in weights]
    for threads, tokens in itertools.product((1, 2), (200, 197, 129)):
        x = torch.randn(tokens, features[0])
        expected = _chain_reference(x, weights, biases, acts)
        scale = max(expected.abs().max().item(), 1.0)
        with torch_threads(threads), torch_sparsecpu.force_isa(isa):
            fused = ops.linear_chain(x, weights, packed, biases, acts)
            separate = x
            for w, p, b, a in zip(weights, packed, biases, acts, strict=True):
                separate = ops.linear(separate, w, p, b, a)
        what = f"block_rows={block_rows} threads={threads} tokens={tokens}"
        assert_close_rel(fused, separate, what=f"fused vs separate, {what}", scale=scale)
        assert_close_rel(fused, expected.float(), what=f"fused vs float64, {what}", scale=scale)


# Long chains (6 to 8 layers through the op, 8 through torch.compile) run in a child
# process: the op once read a long chain's activation names through dangling string
# views, and such a regression would be a crash.
_LONG_CHAIN_CHILD = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn
    import torch_sparsecpu
    from torch_sparsecpu import ops
    torch.manual_seed(0)
    ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "none": lambda t: t,
           "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    problems = []
    for layers in (6, 7, 8):  # the op directly
        ws = [torch.randn(64, 64) * (torch.rand(64, 64) > 0.9) for _ in range(layers)]
        ps = [ops.pack_linear(w) for w in ws]
        bs = [torch.randn(64) for _ in range(layers)]
        acts = [["relu", "gelu", "silu", "gelu_tanh"][i % 4] for i in range(layers - 1)] + ["none"]
        for it in range(30):
            x = torch.randn(it % 9 + 1, 64)
            ref = x
            for w, b, a in zip(ws, bs, acts):
                ref = ACT[a](F.linear(ref, w, b))
            try:
                y = ops.linear_chain(x, ws, ps, bs, acts)
                err = (y - ref).abs().max().item() / ref.abs().max().item()
                if err > 1e-4:
                    problems.append(f"op, {layers} layers: relative error {err:.3g}")
            except Exception as exc:
                problems.append(f"op, {layers} layers: {type(exc).__name__}: {str(exc)[:80]}")
    mods = []  # and through torch.compile: 8 consecutive sparse linears
    for i in range(8):
        mods += [nn.Linear(64, 64), nn.ReLU()]
    model = torch_sparsecpu.magnitude_prune_(nn.Sequential(*mods[:-1]).eval(), 0.9)
    fast = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    with torch.no_grad():
        for it in range(10):
            x = torch.randn(4, 64)
            try:
                y, ref = fast(x), model(x)
                err = (y - ref).abs().max().item() / ref.abs().max().item()
                if err > 1e-4:
                    problems.append(f"compiled: relative error {err:.3g}")
            except Exception as exc:
                problems.append(f"compiled: {type(exc).__name__}: {str(exc)[:80]}")
    print(f"PROBLEMS {len(problems)}")
    for p in problems[:5]:
        print(p)
""")


def test_long_sparse_chains():
    assert "PROBLEMS 0" in run_child(_LONG_CHAIN_CHILD)
