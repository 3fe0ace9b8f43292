"""Property tests of the sparse linear, conv2d and chain ops against dense PyTorch.

``ops.linear(x, w, ops.pack_linear(w, k_block=..., row_block=..., block_rows=...), b, act)`` must equal
``act(F.linear(x, w, b))`` to 1e-5 relative (of the largest output) for every shape
(including no tokens and a single feature), sparsity, block structure of the zeros,
input layout (transposed, sliced, broadcast views), activation and ISA.

"Relative to the largest output" assumes the outputs are not much smaller than the
products they sum. With few outputs whose terms cancel (e.g. one output of 128 terms
summing to 0.08) no float32 summation meets it: fp32 F.linear itself is 1.6e-5 off the
exact result there. So the tolerance is 1e-5 of max(largest output, largest sum of
|terms|), the scale float32 rounding works at; a wrong index or value still costs a whole
term, i.e. about 1/in_features of that scale, far above it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import torch_sparsecpu
from torch_sparsecpu import ops

from conftest import ACTIVATION_REFERENCE, assert_close_rel, int8_reference

ISAS = torch_sparsecpu.available_isas()
K_BLOCKS = (0, 1, 7, 64, 128)
ROW_BLOCKS = (1, 5, 32, 64)
BLOCK_ROWS = (None, 1, 4)  # None: ops.default_block_rows


def valid_block_rows(block_rows: int | None, out_f: int, row_block: int) -> int | None:
    """4 x 1 blocks need 4 | out_features and 4 | row_block; otherwise the default."""
    return None if block_rows == 4 and (out_f % 4 or row_block % 4) else block_rows


def stored_values(weight: torch.Tensor, packed: torch.Tensor) -> int:
    """Values a packed weight must store: its nonzeros, or 4 per nonzero 4 x 1 block."""
    if ops.packed_info(packed).block_rows == 1:
        return int(torch.count_nonzero(weight))
    return 4 * int(weight.reshape(-1, 4, weight.size(1)).ne(0).any(1).sum())


STRUCTURES = ("random", "blocks_4x1", "blocks_1x4", "zero_rows", "zero_cols", "all_zero", "dense")
LAYOUTS = ("contiguous", "transposed", "feature_stride", "token_slice", "offset_view", "broadcast")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """Dense PyTorch, in float64 so that only the op's own rounding is measured."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return ACTIVATION_REFERENCE[act](y).float()


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, term_scale: torch.Tensor, rel: float, what: str
) -> None:
    """assert_close_rel with ``rel`` of the largest output, widened where the outputs
    cancel to ``rel`` of the largest sum of |terms| (module docstring)."""
    largest = expected.abs().max().item() if expected.numel() else 0.0
    terms = term_scale.max().item() if term_scale.numel() else 0.0
    if largest > 0.0:
        assert_close_rel(actual, expected, rel=rel * max(1.0, terms / largest), what=what)
    else:  # all outputs exactly zero
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
        error = actual.abs().max().item() if actual.numel() else 0.0
        assert error <= rel * terms + 1e-30, f"{what}: max error {error:.3g}, expected all zeros"


def term_scale(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per output, the sum of |products| (and |bias|): what float32 rounding scales with."""
    return F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())


def make_weight(out_f: int, in_f: int, sparsity: float, structure: str, gen: torch.Generator) -> torch.Tensor:
    weight = torch.randn(out_f, in_f, generator=gen)
    if structure == "dense":
        return weight
    if structure == "all_zero":
        return torch.zeros(out_f, in_f)
    if structure == "random":
        keep = torch.rand(out_f, in_f, generator=gen) >= sparsity
    elif structure == "blocks_4x1":  # 4 consecutive output rows share a zero pattern
        keep = (torch.rand((out_f + 3) // 4, in_f, generator=gen) >= sparsity).repeat_interleave(4, 0)[:out_f]
    elif structure == "blocks_1x4":  # 4 consecutive input features share a zero pattern
        keep = (torch.rand(out_f, (in_f + 3) // 4, generator=gen) >= sparsity).repeat_interleave(4, 1)[:, :in_f]
    elif structure == "zero_rows":  # whole output channels pruned, the rest random
        keep = (torch.rand(out_f, 1, generator=gen) >= sparsity) & (torch.rand(out_f, in_f, generator=gen) >= 0.5)
    elif structure == "zero_cols":  # whole input features pruned
        keep = (torch.rand(1, in_f, generator=gen) >= sparsity).expand(out_f, in_f)
    else:
        raise AssertionError(structure)
    return weight * keep


def make_input(lead: tuple[int, ...], in_f: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    """An input of shape [*lead, in_f] with the given memory layout (values ~ N(0, 1))."""
    shape = (*lead, in_f)
    if layout == "contiguous":
        return torch.randn(shape, generator=gen)
    if layout == "transposed":  # feature-major storage: stride 1 along the tokens
        return torch.randn(tuple(reversed(shape)), generator=gen).permute(*reversed(range(len(shape))))
    if layout == "feature_stride":  # every other feature of a wider tensor
        return torch.randn((*lead, 2 * in_f), generator=gen)[..., ::2]
    if layout == "token_slice":  # every third token along the first dim
        if not lead:
            return torch.randn(shape, generator=gen)
        return torch.randn((3 * lead[0] + 1, *lead[1:], in_f), generator=gen)[1::3]
    if layout == "offset_view":  # a window that starts inside a bigger buffer
        return torch.randn((*[d + 1 for d in lead], in_f + 5), generator=gen)[
            tuple(slice(1, None) for _ in lead) + (slice(3, 3 + in_f),)
        ]
    if layout == "broadcast":  # stride 0 over the tokens
        return torch.randn(in_f, generator=gen).expand(shape)
    raise AssertionError(layout)


@st.composite
def cases(draw):
    in_f = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 8, 16, 64, 128, 129, 256])))
    out_f = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 4, 5, 32, 64, 65])))
    tokens = draw(st.one_of(st.integers(0, 150), st.sampled_from([0, 1, 2, 7, 8, 15, 16, 17, 64, 65])))
    rank = draw(st.sampled_from(["1d", "2d", "3d", "4d"]))
    if rank == "1d":
        lead: tuple[int, ...] = ()
    elif rank == "2d":
        lead = (tokens,)
    elif rank == "3d":
        first = draw(st.integers(1, 5))
        lead = (first, tokens // first)
    else:
        lead = (2, draw(st.integers(0, 3)), max(tokens // 8, 0))
    return dict(
        in_f=in_f,
        out_f=out_f,
        lead=lead,
        sparsity=draw(st.floats(0.0, 1.0)),
        structure=draw(st.sampled_from(STRUCTURES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        has_bias=draw(st.booleans()),
        act=draw(st.sampled_from(ops.ACTIVATIONS)),
        isa=draw(st.sampled_from(ISAS)),
        k_block=draw(st.sampled_from(K_BLOCKS)),
        row_block=draw(st.sampled_from(ROW_BLOCKS)),
        block_rows=draw(st.sampled_from(BLOCK_ROWS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_sparse_linear_matches_dense(case):
    gen = torch.Generator().manual_seed(case["seed"])
    weight = make_weight(case["out_f"], case["in_f"], case["sparsity"], case["structure"], gen)
    bias = torch.randn(case["out_f"], generator=gen) if case["has_bias"] else None
    x = make_input(case["lead"], case["in_f"], case["layout"], gen)
    assume(x.shape == (*case["lead"], case["in_f"]))

    block_rows = valid_block_rows(case["block_rows"], case["out_f"], case["row_block"])
    packed = ops.pack_linear(weight, k_block=case["k_block"], row_block=case["row_block"], block_rows=block_rows)
    assert ops.packed_info(packed).nnz == stored_values(weight, packed), "nnz in the header"
    with torch_sparsecpu.force_isa(case["isa"]):
        assert torch_sparsecpu.isa() == case["isa"]
        y = ops.linear(x, weight, packed, bias, case["act"])
    expected = reference(x, weight, bias, case["act"])
    assert y.is_contiguous(), "outputs are contiguous"
    assert_close_scaled(
        y, expected, term_scale(x, weight, bias), rel=1e-5, what=str({k: v for k, v in case.items() if k != "seed"})
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), block_cols=st.sampled_from([None, 1, 4]))
def test_int8_linear_matches_integer_reference(case, block_cols):
    """int8 buffers (``quantize="int8"``): the same shapes, structures, layouts and ISAs
    against the integer reference of conftest (int8_reference), exactly up to the final
    rounding (1 ulp), then the activation within 1e-5 of the largest pre-activation.
    Activations are scaled so that outputs do not overflow float32 (int8 tokens with an
    infinite range give NaN)."""
    gen = torch.Generator().manual_seed(case["seed"])
    weight = make_weight(case["out_f"], case["in_f"], case["sparsity"], case["structure"], gen)
    bias = torch.randn(case["out_f"], generator=gen) if case["has_bias"] else None
    x = make_input(case["lead"], case["in_f"], case["layout"], gen)
    assume(x.shape == (*case["lead"], case["in_f"]))
    k_block = case["k_block"] if case["k_block"] % 4 == 0 else 4 * case["k_block"]
    packed = ops.pack_linear(
        weight, quantize="int8", block_cols=block_cols, k_block=k_block, row_block=case["row_block"]
    )
    with torch_sparsecpu.force_isa(case["isa"]):
        y = ops.linear(x, weight, packed, bias, case["act"])
    pre = int8_reference(x, weight, bias)
    expected = ACTIVATION_REFERENCE[case["act"]](pre.double()).float()
    scale = max(pre.abs().max().item() if pre.numel() else 0.0, 1e-30)
    tolerance = 1e-5 * scale if case["act"] != "none" else torch.finfo(torch.float32).eps * scale
    error = (y - expected).abs().max().item() if y.numel() else 0.0
    assert y.shape == expected.shape and y.is_contiguous()
    what = {k: v for k, v in case.items() if k != "seed"}
    assert error <= tolerance, f"{what} block_cols={block_cols}: {error:.3g}"


def test_every_isa_covered():
    # The property test samples ISAs; make sure the list is what the CPU offers.
    assert "scalar" in ISAS
    assert set(ISAS) <= set(torch_sparsecpu.kernels.ISAS)


@st.composite
def chain_cases(draw):
    widths = draw(st.lists(st.integers(1, 200), min_size=3, max_size=5))
    tokens = draw(st.one_of(st.integers(0, 150), st.sampled_from([0, 1, 3, 7, 8, 65])))
    layers = len(widths) - 1
    return dict(
        widths=widths,
        lead=draw(st.sampled_from([(tokens,), (2, tokens // 2)])),
        sparsities=[draw(st.floats(0.0, 1.0)) for _ in range(layers)],
        structures=[draw(st.sampled_from(STRUCTURES)) for _ in range(layers)],
        biases=[draw(st.booleans()) for _ in range(layers)],
        acts=[draw(st.sampled_from(ops.ACTIVATIONS)) for _ in range(layers)],
        layout=draw(st.sampled_from(LAYOUTS)),
        isa=draw(st.sampled_from(ISAS)),
        k_block=draw(st.sampled_from(K_BLOCKS)),
        row_block=draw(st.sampled_from(ROW_BLOCKS)),
        block_rows=draw(st.sampled_from(BLOCK_ROWS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=chain_cases())
def test_sparse_linear_chain_matches_dense(case):
    """``ops.linear_chain`` (consecutive layers fused panel by panel) against the dense
    layers one after another."""
    gen = torch.Generator().manual_seed(case["seed"])
    widths = case["widths"]
    weights, packed, biases = [], [], []
    for i in range(len(widths) - 1):
        weight = make_weight(widths[i + 1], widths[i], case["sparsities"][i], case["structures"][i], gen)
        weights.append(weight)
        block_rows = valid_block_rows(case["block_rows"], widths[i + 1], case["row_block"])
        packed.append(
            ops.pack_linear(weight, k_block=case["k_block"], row_block=case["row_block"], block_rows=block_rows)
        )
        biases.append(torch.randn(widths[i + 1], generator=gen) if case["biases"][i] else None)
    x = make_input(case["lead"], widths[0], case["layout"], gen)

    with torch_sparsecpu.force_isa(case["isa"]):
        y = ops.linear_chain(x, weights, packed, biases, case["acts"])
    expected, scale = x.double(), x.double().abs()
    for weight, bias, act in zip(weights, biases, case["acts"], strict=True):
        expected = reference(expected, weight, bias, act).double()
        scale = term_scale(scale, weight, bias) * 1.13  # |act'| <= 1.13 (GELU's maximum)
    expected = expected.float()
    assert y.is_contiguous()
    # Each layer's rounding is carried into the next: allow it once per layer.
    assert_close_scaled(
        y, expected, scale, rel=1e-5 * (len(widths) - 1), what=str({k: v for k, v in case.items() if k != "seed"})
    )


def conv_packing_and_layout(draw) -> dict:
    """The weights' sparsity and packing, the input's layout and the ISA of a convolution case."""
    return dict(
        sparsity=draw(st.sampled_from((0.0, 0.5, 0.9, 1.0))),
        k_block=draw(st.sampled_from(K_BLOCKS)),
        row_block=draw(st.sampled_from(ROW_BLOCKS)),
        channels_last=draw(st.booleans()),
        isa=draw(st.sampled_from(ISAS)),
    )


@st.composite
def conv_cases(draw):
    """A convolution's geometry, packing, layout, activation and ISA, with an image at
    least as large as the dilated kernel."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = [draw(st.integers(max(1, dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i]), 12)) for i in range(2)]
    return dict(
        batch=draw(st.integers(0, 3)),
        in_c=draw(st.integers(1, 20)),
        out_c=draw(st.integers(1, 40)),
        size=size,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=draw(st.booleans()),
        act=draw(st.sampled_from(ops.ACTIVATIONS)),
        **conv_packing_and_layout(draw),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_sparse_conv2d_matches_dense(case):
    gen = torch.Generator().manual_seed(0)
    shape = (case["out_c"], case["in_c"], *case["kernel"])
    weight = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) >= case["sparsity"])
    bias = torch.randn(case["out_c"], generator=gen) if case["bias"] else None
    x = torch.randn(case["batch"], case["in_c"], *case["size"], generator=gen)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    packed = ops.pack_linear(weight.flatten(1), k_block=case["k_block"], row_block=case["row_block"])
    with torch_sparsecpu.force_isa(case["isa"]):
        actual = ops.conv2d(x, weight, packed, bias, **geometry, activation=case["act"])
    pre = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), **geometry)
    expected = ACTIVATION_REFERENCE[case["act"]](pre).float()
    assert actual.shape == expected.shape
    # The scale float32 rounding works at: the largest output or sum of |terms| (module docstring).
    terms = F.conv2d(x.abs().double(), weight.abs().double(), None, **geometry)
    scale = max(float(expected.abs().max()), float(terms.max())) if expected.numel() else 0.0
    assert_close_rel(actual, expected, scale=scale, what=str(case))


@st.composite
def conv_chain_cases(draw):
    """A chain of 1..3 convolutions (the first 1 x 1 without padding; the others may be
    dense depthwise ones, padded per side), with or without a residual shortcut into a
    last 1 x 1 layer, its packing, layout, band height and ISA."""
    layers = draw(st.integers(1, 3))
    kernels = [1] + [draw(st.sampled_from((1, 3))) for _ in range(layers - 1)]
    strides = [draw(st.integers(1, 2)) for _ in range(layers)]
    depthwise = [False] + [draw(st.booleans()) for _ in range(layers - 1)]
    # (top, bottom, left, right) per layer
    paddings = [(0, 0, 0, 0)] + [
        tuple(draw(st.integers(0, k // 2)) for _ in range(4)) if dw else (draw(st.integers(0, k // 2)),) * 4
        for k, dw in zip(kernels[1:], depthwise[1:], strict=True)
    ]
    shortcut = draw(st.booleans()) and kernels[-1] == 1 and strides[-1] == 1 and not depthwise[-1]
    channels = [draw(st.integers(1, 12)) for _ in range(layers + 1)]
    for i, dw in enumerate(depthwise):  # a depthwise layer keeps its input's channels
        if dw:
            channels[i + 1] = channels[i]
    # An identity shortcut adds the input itself: the output has the input's channels.
    identity = shortcut and draw(st.booleans())
    if identity:
        channels[-1] = channels[0]
    return dict(
        batch=draw(st.integers(0, 2)),
        channels=channels,
        size=(draw(st.integers(3, 13)), draw(st.integers(3, 13))),
        kernels=kernels,
        strides=strides,
        paddings=paddings,
        depthwise=depthwise,
        shortcut=shortcut,
        identity=identity,
        acts=[draw(st.sampled_from(ops.ACTIVATIONS)) for _ in range(layers)],
        band_rows=draw(st.integers(0, 3)),
        split_channels=draw(st.sampled_from([None, False, True])),
        **conv_packing_and_layout(draw),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_chain_cases())
def test_sparse_conv_chain_matches_dense(case):
    """``ops.conv_chain`` (layers fused band of rows by band, dense depthwise layers among
    them, a residual shortcut as extra input channels of the last layer) against dense
    convolutions one after another."""
    gen = torch.Generator().manual_seed(0)
    channels, kernels, strides, paddings = case["channels"], case["kernels"], case["strides"], case["paddings"]
    x = torch.randn(case["batch"], channels[0], *case["size"], generator=gen)
    height, width = case["size"]
    for k, s, (top, bottom, left, right) in zip(kernels, strides, paddings, strict=True):
        height, width = (height + top + bottom - k) // s + 1, (width + left + right - k) // s + 1
    assume(height >= 1 and width >= 1)
    total_stride = 1
    for s in strides:
        total_stride *= s
    if case["shortcut"]:  # the chain's input sampled at its stride must have the output's size
        assume(
            ((case["size"][0] - 1) // total_stride + 1, (case["size"][1] - 1) // total_stride + 1) == (height, width)
        )
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    weights, depthwise = [], case["depthwise"]
    for i, k in enumerate(kernels):
        projection = case["shortcut"] and not case["identity"] and i == len(kernels) - 1
        in_c = channels[i] + (channels[0] if projection else 0)
        shape = (channels[i + 1], 1 if depthwise[i] else in_c, k, k)
        weights.append(torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) >= case["sparsity"]))
    biases = [torch.randn(w.size(0), generator=gen) for w in weights]
    packed = [
        torch.empty(0) if dw else ops.pack_linear(w.flatten(1), k_block=case["k_block"], row_block=case["row_block"])
        for w, dw in zip(weights, depthwise, strict=True)
    ]
    with torch_sparsecpu.force_isa(case["isa"]):
        actual = ops.conv_chain(
            x,
            weights,
            packed,
            biases,
            strides,
            paddings,
            case["acts"],
            shortcut=case["shortcut"],
            band_rows=0 if case["split_channels"] else case["band_rows"],
            split_channels=case["split_channels"],
        )
    # float64 layer by layer; the scale rounding works at grows with each layer's sum of |terms|.
    h, scale = x.double(), x.double().abs()
    for i, (weight, bias, act) in enumerate(zip(weights, biases, case["acts"], strict=True)):
        w64, b64 = weight.double(), bias.double()
        if case["shortcut"] and i == len(weights) - 1:
            own, sampled = h.size(1), x.double()[:, :, ::total_stride, ::total_stride]
            if case["identity"]:  # the input added
                pre = F.conv2d(h, w64, b64) + sampled
                terms = F.conv2d(scale, w64.abs(), b64.abs()) + sampled.abs()
            else:
                pre = F.conv2d(h, w64[:, :own], b64) + F.conv2d(sampled, w64[:, own:])
                terms = F.conv2d(scale, w64[:, :own].abs(), b64.abs()) + F.conv2d(sampled.abs(), w64[:, own:].abs())
        else:
            top, bottom, left, right = paddings[i]
            conv = dict(stride=strides[i], groups=h.size(1) if depthwise[i] else 1)
            pad = functools.partial(F.pad, pad=(left, right, top, bottom))
            pre = F.conv2d(pad(h), w64, b64, **conv)
            terms = F.conv2d(pad(scale), w64.abs(), b64.abs(), **conv)
        h, scale = ACTIVATION_REFERENCE[act](pre), terms * 1.13  # |act'| <= 1.13 (GELU's maximum)
    expected = h.float()
    assert actual.shape == expected.shape
    largest = float(scale.max()) if scale.numel() else 0.0
    assert_close_rel(
        actual,
        expected,
        rel=1e-5 * len(weights),
        scale=max(largest, float(expected.abs().max()) if expected.numel() else 0.0),
        what=str(case),
    )
