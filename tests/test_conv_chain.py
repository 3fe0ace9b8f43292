"""Consecutive convolutions as tensor columns: the sparsecpu::conv_chain op against
F.conv2d, its argument checks, and the backend's fusion of ResNet bottlenecks (with
fuse_layers=False and eager as references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import torch_sparsecpu
from torch_sparsecpu import ops
from torch_sparsecpu.kernels import torch_threads

from conftest import EAGER, assert_close_rel, compile_sparse, sparse_weight

ISAS = torch_sparsecpu.available_isas()


def conv_weight(out_channels: int, in_channels: int, kernel: int, sparsity: float = 0.8) -> torch.Tensor:
    weight = sparse_weight(out_channels, in_channels * kernel * kernel, sparsity)
    return weight.view(out_channels, in_channels, kernel, kernel)


def bottleneck_args(in_c, mid_c, out_c, stride, shortcut, *, biases=True):
    """The op arguments of a bottleneck 1x1 -> 3x3 (stride) -> 1x1: shortcut is None,
    "identity" (the input added), "eye" (the identity as a projection) or "projection"
    (a 1 x 1 convolution at the stride, appended to the last weight along its input
    channels)."""
    weights = [conv_weight(mid_c, in_c, 1), conv_weight(mid_c, mid_c, 3), conv_weight(out_c, mid_c, 1)]
    if shortcut == "eye":
        weights[-1] = torch.cat([weights[-1], torch.eye(out_c).view(out_c, out_c, 1, 1)], 1)
    elif shortcut == "projection":
        weights[-1] = torch.cat([weights[-1], conv_weight(out_c, in_c, 1)], 1)
    biases = [torch.randn(w.size(0)) if biases else None for w in weights]
    return weights, biases, [1, stride, 1], [0, 1, 0]


def reference(x, weights, biases, strides, paddings, activations, shortcut: bool):
    """The chain layer by layer in float64, the shortcut as F.conv2d of the strided input."""
    h, x64 = x.double(), x.double()
    for layer, (weight, bias, stride, padding, act) in enumerate(
        zip(weights, biases, strides, paddings, activations, strict=True)
    ):
        weight, bias = weight.double(), None if bias is None else bias.double()
        if shortcut and layer == len(weights) - 1:
            total = 1
            for s in strides:
                total *= s
            own, sampled = h.size(1), x64[:, :, ::total, ::total]
            if weight.size(1) == own:  # an identity shortcut: the input added
                z = F.conv2d(h, weight, bias) + sampled
            else:
                z = F.conv2d(h, weight[:, :own], bias) + F.conv2d(sampled, weight[:, own:])
        else:
            z = F.conv2d(h, weight, bias, stride, padding)
        h = {"relu": F.relu, "none": lambda v: v, "relu6": F.relu6}[act](z)
    return h.float()


def run_chain(
    x,
    weights,
    biases,
    strides,
    paddings,
    activations,
    shortcut,
    band_rows=0,
    isa=None,
    packed=None,
    split_channels=None,
):
    """ops.conv_chain under ``isa``, the weights packed here unless ``packed`` is given."""
    packed = packed or [ops.pack_linear(w.flatten(1)) for w in weights]
    with torch_sparsecpu.force_isa(isa or torch_sparsecpu.isa()):
        return ops.conv_chain(
            x,
            weights,
            packed,
            biases,
            strides,
            paddings,
            activations,
            shortcut=shortcut,
            band_rows=band_rows,
            split_channels=split_channels,
        )


# batch, in, mid, out, height, width, stride, shortcut: odd sizes (7, 14, 15), stride 2
# inside the chain, batch > 1, identity and projection shortcuts
BOTTLENECKS = [
    (1, 16, 8, 16, 7, 7, 1, "identity"),
    (2, 16, 8, 16, 14, 14, 1, "identity"),
    (2, 16, 8, 16, 13, 14, 1, "eye"),
    (1, 16, 8, 32, 15, 15, 2, "projection"),
    (2, 24, 8, 40, 15, 13, 2, "projection"),
    (1, 16, 8, 24, 14, 14, 1, "projection"),
    (3, 16, 4, 8, 9, 11, 2, None),
    # the tap layout: 14 x 14 and 28 x 28 (pitch 16 and 32 floats, one and two AVX-512
    # registers, read by wider panels) and rows wider than one panel
    (1, 8, 4, 8, 60, 62, 1, "identity"),
    (2, 16, 8, 16, 28, 28, 1, "identity"),
    (1, 16, 8, 32, 28, 28, 2, "projection"),
    # 14 x 14 at stride 2, as ResNet-50's chain into 7 x 7
    (1, 16, 8, 32, 14, 14, 2, "projection"),
    # 128 input channels and planes of whole registers (8 x 12): the first layer reads the
    # input in place, and copies the panels that would run past an image's last plane
    (3, 128, 8, 128, 8, 12, 1, "identity"),
    (2, 128, 8, 24, 8, 12, 1, "projection"),
]


def bottleneck_case(case, channels_last):
    """A BOTTLENECKS case's input, op arguments and float64 reference."""
    batch, in_c, mid_c, out_c, height, width, stride, shortcut = case
    weights, biases, strides, paddings = bottleneck_args(in_c, mid_c, out_c, stride, shortcut)
    x = torch.randn(batch, in_c, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    activations = ["relu", "relu", "relu" if shortcut else "none"]
    expected = reference(x, weights, biases, strides, paddings, activations, shortcut is not None)
    return x, weights, biases, strides, paddings, activations, shortcut, expected


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", BOTTLENECKS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bottleneck_matches_conv2d(isa, case, channels_last):
    x, weights, biases, strides, paddings, activations, shortcut, expected = bottleneck_case(case, channels_last)
    # every band at an image border, or none; whole images split by channels
    for band_rows, split in ((0, None), (1, None), (2, None), (5, None), (0, True)):
        actual = run_chain(
            x,
            weights,
            biases,
            strides,
            paddings,
            activations,
            shortcut is not None,
            band_rows,
            isa,
            split_channels=split,
        )
        what = f"{isa} {case} band_rows={band_rows} split_channels={split}"
        assert_close_rel(actual, expected, what=what)
        # Channels-last in, channels-last out, like F.conv2d.
        assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(
    "kernels,strides,paddings",
    [
        ([1, 1, 1], [1, 1, 1], [0, 0, 0]),  # pointwise layers read the previous tile
        ([1, 3, 3], [1, 1, 2], [0, 1, 1]),  # two k x k layers, the second strided
        ([1, 5, 1], [1, 1, 1], [0, 2, 0]),  # a 5 x 5 kernel: halos of 2 rows
        ([1, 1], [2, 1], [0, 0]),  # a strided first layer
        ([1, 3], [1, 1], [0, 0]),  # a k x k layer without padding
        ([1, 1, 3], [1, 2, 1], [0, 0, 1]),  # a strided 1 x 1 layer inside the chain
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_other_chains_match_conv2d(kernels, strides, paddings, channels_last):
    channels = [12, 8, 16, 8][: len(kernels) + 1]
    weights = [conv_weight(channels[i + 1], channels[i], k) for i, k in enumerate(kernels)]
    biases = [torch.randn(w.size(0)) for w in weights]
    activations = ["relu6", "relu", "none"][: len(kernels)]
    x = torch.randn(2, 12, 13, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = reference(x, weights, biases, strides, paddings, activations, False)
    for band_rows in (0, 1, 3):
        actual = run_chain(x, weights, biases, strides, paddings, activations, False, band_rows)
        assert_close_rel(actual, expected, what=f"{kernels} band_rows={band_rows}")


@pytest.mark.parametrize("band_rows", [0, 2])
def test_band_at_the_bottom_edge_needs_the_most_rows(band_rows):
    """3 output rows in bands of 1 and 2 rows: no band has halos on both sides, and the
    bottom one needs more rows of the middle layer than the top one (its band image
    must be sized for it: the fuzz test once found it overrun)."""
    kernels, strides, paddings = [1, 3, 3], [2, 1, 2], [0, 1, 1]
    weights = [conv_weight(c_out, c_in, k) for c_in, c_out, k in zip([11, 6, 2], [6, 2, 11], kernels, strict=True)]
    biases = [torch.randn(w.size(0)) for w in weights]
    x = torch.randn(1, 11, 12, 6)
    activations = ["relu", "none", "relu"]
    expected = reference(x, weights, biases, strides, paddings, activations, False)
    actual = run_chain(x, weights, biases, strides, paddings, activations, False, band_rows)
    assert_close_rel(actual, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rolling_bands_over_any_thread_ranges(threads):
    """Rolling bands: a thread keeps the halo rows its previous band of the same image
    computed. With 1, 2 or 3 threads the ranges start at different bands (some mid-image,
    some across two images of the batch), and bands of 1, 2 or 3 rows roll through a
    stride-2 3 x 3 layer and a 3 x 3 layer of stride 1 (two band images)."""
    kernels, strides, paddings = [1, 3, 3, 1], [1, 2, 1, 1], [0, 1, 1, 0]
    channels = [6, 5, 4, 7, 6]
    weights = [conv_weight(c_out, c_in, k) for c_in, c_out, k in zip(channels[:-1], channels[1:], kernels, strict=True)]
    biases = [torch.randn(w.size(0)) for w in weights]
    x = torch.randn(3, 6, 23, 17)
    activations = ["relu", "relu", "none", "relu"]
    expected = reference(x, weights, biases, strides, paddings, activations, False)
    with torch_threads(threads):
        for band_rows in (1, 2, 3, 0):
            actual = run_chain(x, weights, biases, strides, paddings, activations, False, band_rows)
            assert_close_rel(actual, expected, what=f"{threads} threads, band_rows={band_rows}")


@pytest.mark.parametrize("threads", [1, 2])
def test_weights_larger_than_l2(threads):
    """A chain whose weights alone (2.5 MiB packed: a 3 x 3 layer 256 -> 256 with 25%
    zeros) fill the L2 of every machine here: the planner charges every band for
    streaming them from L3 (docs/tile_planner.md) and takes whole images on one thread;
    on an odd size, with the tap layout and an identity shortcut."""
    weights = [conv_weight(256, 32, 1), conv_weight(256, 256, 3, sparsity=0.25), conv_weight(32, 256, 1)]
    biases = [torch.randn(w.size(0)) for w in weights]
    strides, paddings, activations = [1, 1, 1], [0, 1, 0], ["relu", "relu", "relu"]
    x = torch.randn(2, 32, 13, 14)
    expected = reference(x, weights, biases, strides, paddings, activations, True)
    with torch_threads(threads):
        for band_rows in (0, 1):
            actual = run_chain(x, weights, biases, strides, paddings, activations, True, band_rows)
            assert_close_rel(actual, expected, what=f"{threads} threads, band_rows={band_rows}")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "case",
    [
        BOTTLENECKS[0],  # 7 x 7: one panel, an identity shortcut
        BOTTLENECKS[4],  # batch 2, stride 2, a projection shortcut
        BOTTLENECKS[7],  # 60 x 62: many panels per stage, the tap layout
        (2, 128, 8, 24, 8, 12, 1, "projection"),  # the input read in place
        (1, 16, 300, 130, 7, 7, 1, None),  # 3 and 2 row blocks of 128 rows: a member gets none with 3 threads
        # every layer 2 row blocks: each member adds its own channels of the input
        (1, 256, 130, 256, 7, 7, 1, "identity"),
        (2, 136, 8, 136, 8, 12, 1, "identity"),  # and reads the input in place
        (1, 24, 8, 200, 14, 14, 2, "projection"),
    ],
    ids=lambda c: "x".join(map(str, c)),
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_split_channels_over_any_team(threads, case, channels_last):
    """split_channels=True: each image one band that all threads run together, every
    layer's row blocks, panel features and output channels shared out among them
    (docs/tile_planner.md). With 2 or 3 threads some shares are uneven or empty."""
    x, weights, biases, strides, paddings, activations, shortcut, expected = bottleneck_case(case, channels_last)
    with torch_threads(threads):
        for isa in ISAS:
            actual = run_chain(
                x, weights, biases, strides, paddings, activations, shortcut is not None, isa=isa, split_channels=True
            )
            assert_close_rel(actual, expected, what=f"{isa} {threads} threads")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tf_padding", [False, True], ids=["symmetric", "tf_same"])
@pytest.mark.parametrize("threads", [1, 2])
def test_stride_2_taps(isa, tf_padding, threads):
    """A 3 x 3 layer of stride 2 reads its band image in place, split into phases of even
    and odd rows and columns (docs/tile_planner.md): a 28 x 30 input (14 x 15 outputs,
    rows of 16 tokens), padded on every side or, TensorFlow's "same", only at the bottom
    and right (padded columns then start on an odd phase); bands of every height, rolling
    on 2 threads, with a projection shortcut, against float64 F.conv2d."""
    weights, biases, strides, _ = bottleneck_args(16, 8, 24, 2, "projection")
    top, bottom, left, right = same_padding(28, 30, 3, 2) if tf_padding else (1, 1, 1, 1)
    paddings = [0, (top, bottom, left, right), 0]
    x = torch.randn(2, 16, 28, 30)
    w = [weight.double() for weight in weights]
    b = [bias.double() for bias in biases]
    h = F.relu(F.conv2d(x.double(), w[0], b[0]))
    h = F.relu(F.conv2d(F.pad(h, (left, right, top, bottom)), w[1], b[1], stride=2))
    expected = F.relu(F.conv2d(h, w[2][:, :8], b[2]) + F.conv2d(x.double()[:, :, ::2, ::2], w[2][:, 8:])).float()
    with torch_threads(threads):
        for band_rows in (0, 1, 2, 3, 5):
            actual = run_chain(x, weights, biases, strides, paddings, ["relu"] * 3, True, band_rows, isa)
            assert_close_rel(actual, expected, what=f"{isa} {threads} threads, band_rows={band_rows}")


@pytest.mark.parametrize("width", [22, 28], ids=["strided_view", "tap_sized"])
def test_strided_views_and_4x1_blocks(width):
    """A non-contiguous input (every other column) and weights packed in 4 x 1 blocks
    (the 3 x 3 layer then computes wide rows where 1 x 1 blocks would take the tap layout)."""
    weights, biases, strides, paddings = bottleneck_args(16, 8, 16, 1, "identity")
    x = torch.randn(1, 16, 14, width)[:, :, :, ::2]
    activations = ["relu"] * 3
    packed = [ops.pack_linear(w.flatten(1), block_rows=4, k_block=16) for w in weights]
    actual = ops.conv_chain(x, weights, packed, biases, strides, paddings, activations, shortcut=True)
    assert_close_rel(actual, reference(x, weights, biases, strides, paddings, activations, True))


def test_empty_batch_and_single_pixel():
    weights, biases, strides, paddings = bottleneck_args(8, 4, 8, 1, "identity")
    args = (weights, [ops.pack_linear(w.flatten(1)) for w in weights], biases, strides, paddings, ["relu"] * 3)
    assert ops.conv_chain(torch.randn(0, 8, 5, 5), *args, shortcut=True).shape == (0, 8, 5, 5)
    x = torch.randn(2, 8, 1, 1)
    actual = ops.conv_chain(x, *args, shortcut=True)
    assert_close_rel(actual, reference(x, weights, biases, strides, paddings, ["relu"] * 3, True))


def test_opcheck_conv_chain():
    weights, biases, strides, paddings = bottleneck_args(8, 4, 12, 2, "projection")
    packed = [ops.pack_linear(w.flatten(1)) for w in weights]
    flat = lambda pairs: [v for p in pairs for v in (p, p)]  # noqa: E731
    for x in (torch.randn(2, 8, 9, 7), torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)):
        args = (x, weights, packed, biases, flat(strides), flat(paddings), ["relu"] * 3, True)
        torch.library.opcheck(torch.ops.sparsecpu.conv_chain.default, (*args, 2))  # bands of 2 rows
        torch.library.opcheck(torch.ops.sparsecpu.conv_chain.default, (*args, 0, True))  # a team per image


def test_conv_chain_bad_arguments():
    weights, biases, strides, paddings = bottleneck_args(8, 4, 8, 1, "eye")
    packed = [ops.pack_linear(w.flatten(1)) for w in weights]
    x = torch.randn(1, 8, 6, 6)
    acts = ["relu"] * 3

    narrow = conv_weight(12, 4, 1)  # the previous layer's 4 channels in, 12 out (the input has 8)
    narrow_packed = ops.pack_linear(narrow.flatten(1))

    def chain(*, x=x, weights=weights, packed=packed, biases=biases, strides=strides, paddings=paddings, **kw):
        return ops.conv_chain(x, weights, packed, biases, strides, paddings, acts, **{"shortcut": True, **kw})

    cases = [
        (ValueError, "same length", lambda: chain(packed=packed[:2])),
        (TypeError, "shortcut must be", lambda: chain(shortcut=1)),
        (ValueError, "band_rows must be >= 0", lambda: chain(band_rows=-1)),
        (TypeError, "split_channels must be True, False or None", lambda: chain(split_channels=1)),
        (ValueError, "split_channels=True.*takes no band_rows", lambda: chain(split_channels=True, band_rows=2)),
        (  # the op itself, past the Python wrapper's checks
            ValueError,
            "split_channels=True.*takes no band_rows",
            lambda: torch.ops.sparsecpu.conv_chain(
                x, weights, packed, biases, [1] * 6, [0, 0, 1, 1, 0, 0], acts, True, 2, True
            ),
        ),
        (
            ValueError,
            "first layer must be a 1 x 1",
            lambda: chain(weights=[weights[1], *weights[1:]], packed=[packed[1], *packed[1:]], paddings=[1, 1, 0]),
        ),
        (ValueError, "input channels", lambda: chain(shortcut=False)),  # the last weight has the shortcut's too
        (
            ValueError,
            "shortcut the input itself.*must have the input's 8 output channels, got 12",
            lambda: chain(
                weights=[*weights[:2], narrow], packed=[*packed[:2], narrow_packed], biases=[*biases[:2], None]
            ),
        ),
        (ValueError, "stride", lambda: chain(strides=[1, 0, 1])),
        (ValueError, "smaller than", lambda: chain(x=torch.randn(1, 8, 1, 1), paddings=[0, 0, 0])),
        (ValueError, "shortcut samples", lambda: chain(paddings=[0, 0, 0])),
        (ValueError, "float32", lambda: chain(x=x.double())),
        (ValueError, "4-D|\\[batch, channels", lambda: chain(x=torch.randn(8, 6, 6))),
        (ValueError, "does not match the packed", lambda: chain(packed=[packed[1], packed[1], packed[2]])),
        (
            ValueError,
            "int8 buffer.*fp32 buffers only",
            lambda: chain(packed=[ops.pack_linear(weights[0].flatten(1), quantize="int8"), *packed[1:]]),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


# ---------------------------------------------------------------------------
# The backend: HF ResNet bottlenecks fused, against fuse_layers=False and eager
# ---------------------------------------------------------------------------


def randomize_batch_norms_(model: nn.Module) -> nn.Module:
    """Non-trivial batch norms, so that folding them is tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def resnet_stage(in_channels=32, hidden=(32, 64), depths=(2, 2), sparsity=0.9, seed=0):
    """A small HF ResNetModel (bottleneck layers; the first layer of each stage but the
    first is stride 2 with a projection shortcut), random init, convolutions pruned."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        embedding_size=in_channels, hidden_sizes=list(hidden), depths=list(depths), layer_type="bottleneck"
    )
    model = transformers.ResNetModel(config).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity, layer_types=(nn.Conv2d,))
    return randomize_batch_norms_(model)


def sparse_op_names(fn, *args) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return [e.name for e in prof.events() if e.name.startswith("sparsecpu::")]


@pytest.mark.parametrize("layer", ["stages.0.layers.1", "stages.1.layers.0"], ids=["identity", "projection_stride2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_hf_bottleneck_is_one_conv_chain_call(layer, channels_last):
    model = resnet_stage()
    block = model.encoder.get_submodule(layer)
    in_channels = block.layer[0].convolution.in_channels
    x = torch.randn(2, in_channels, 15, 15)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = compile_sparse(block, options=EAGER)
    unfused = compile_sparse(block, options={**EAGER, "fuse_layers": False})
    with torch.inference_mode():
        expected = block(x)
        actual = fused(x)
        assert sparse_op_names(fused, x) == ["sparsecpu::conv_chain"]
        assert_close_rel(actual, expected, what="fused vs eager")
        assert_close_rel(actual, unfused(x), what="fused vs fuse_layers=False")
        assert sparse_op_names(unfused, x).count("sparsecpu::conv2d") == 3 + (layer == "stages.1.layers.0")


@pytest.mark.parametrize("size", [7, 14, 15])
def test_hf_resnet_fused_matches_unfused_and_eager_with_inductor(size):
    model = resnet_stage()
    x = torch.randn(2, 3, 4 * size, 4 * size)  # the embedder divides by 4
    fused = compile_sparse(model)
    unfused = compile_sparse(model, options={"fuse_layers": False})
    with torch.inference_mode():
        expected = model(x).last_hidden_state
        actual = fused(x).last_hidden_state
        # The 4 bottlenecks, each one op.
        assert sparse_op_names(fused, x).count("sparsecpu::conv_chain") == 4
        assert_close_rel(actual, expected, rel=1e-4, what="fused vs eager")
        assert_close_rel(actual, unfused(x).last_hidden_state, rel=1e-4, what="fused vs fuse_layers=False")


def test_conv_chains_only_without_grad():
    model = resnet_stage()
    block = model.encoder.stages[0].layers[1]
    x = torch.randn(1, 32, 8, 8)
    compiled = compile_sparse(block, options=EAGER)
    # Grad mode on: no batch norm folded, no chain (neither has an autograd formula).
    assert_close_rel(compiled(x), block(x))
    names = sparse_op_names(compiled, x)
    assert "sparsecpu::conv_chain" not in names and "sparsecpu::conv2d" in names


class PlainBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with biases and no batch norms, identity shortcut."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return F.relu(self.expand(F.relu(self.mix(F.relu(self.reduce(x))))) + x)


def test_unfolded_weights_of_a_residual_chain_are_watched():
    """A chain whose last convolution has no batch norm: its weight is copied into the
    concatenated [W | I] constant, so editing it must rebuild."""
    block = PlainBottleneck().eval()
    torch_sparsecpu.magnitude_prune_(block, 0.9, layer_types=(nn.Conv2d,))
    x = torch.randn(1, 16, 9, 9)
    compiled = compile_sparse(block, options=EAGER)
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x))
        assert sparse_op_names(compiled, x) == ["sparsecpu::conv_chain"]
    with torch.no_grad():
        block.expand.weight.mul_(2)
        block.expand.bias.add_(1)
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x), what="after editing the last convolution")


@pytest.mark.parametrize("model", ["plain", "hf_projection"])
def test_chain_of_weights_pruned_with_prune_hooks(model):
    """Weights computed as weight_orig * weight_mask (torch.nn.utils.prune, hooks kept) are
    folded into constants and still fuse into one chain; edits of a mask or of weight_orig
    after compiling are honoured (the chain is rebuilt)."""
    if model == "plain":
        torch.manual_seed(0)
        block, x = PlainBottleneck().eval(), torch.randn(1, 16, 9, 9)
    else:
        block = resnet_stage(sparsity=0.0).encoder.stages[1].layers[0]  # stride 2, projection shortcut
        x = torch.randn(2, block.layer[0].convolution.in_channels, 15, 15)
    convolutions = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    for conv in convolutions:
        prune.l1_unstructured(conv, "weight", amount=0.9)
    compiled = compile_sparse(block, options=EAGER)
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x))
        assert sparse_op_names(compiled, x) == ["sparsecpu::conv_chain"]
    with torch.no_grad():
        convolutions[-1].weight_mask[:1].zero_()  # the last layer's (or the shortcut's) mask
        convolutions[1].weight_orig.mul_(-1)  # a weight inside the chain
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x), what="after editing a mask and a weight_orig")
        assert sparse_op_names(compiled, x) == ["sparsecpu::conv_chain"]


# ---------------------------------------------------------------------------
# MobileNet inverted residuals: a dense depthwise layer inside the chain
# ---------------------------------------------------------------------------


def same_padding(height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow's "same" padding (HF MobileNetV2's tf_padding) as (top, bottom, left,
    right): uneven for a stride-2 layer of an even input."""

    def sides(size):
        total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
        return total // 2, total - total // 2

    return (*sides(height), *sides(width))


def inverted_residual_args(in_c, expanded, out_c, stride, padding, *, kernel=3):
    """The op arguments of 1x1 expand -> depthwise k x k (stride) -> 1x1 project (with
    shortcut=residual, an identity shortcut); the depthwise layer's packed entry empty,
    half its taps zero."""
    depthwise = torch.randn(expanded, 1, kernel, kernel)
    depthwise[torch.rand_like(depthwise) < 0.5] = 0.0  # pruned taps are skipped
    depthwise[0] = 0.0  # a channel of bias alone
    weights = [conv_weight(expanded, in_c, 1), depthwise, conv_weight(out_c, expanded, 1)]
    packed = [ops.pack_linear(weights[0].flatten(1)), torch.empty(0), ops.pack_linear(weights[2].flatten(1))]
    biases = [torch.randn(w.size(0)) for w in weights]
    return weights, packed, biases, [1, stride, 1], [0, padding, 0]


def inverted_residual_reference(x, weights, biases, stride, padding, residual):
    """The block layer by layer in float64 (relu6 after expand and depthwise)."""
    x64 = x.double()
    w1, wd, w3 = (w.double() for w in weights)
    b1, bd, b3 = (b.double() for b in biases)
    h = F.relu6(F.conv2d(x64, w1, b1))
    top, bottom, left, right = padding
    h = F.relu6(F.conv2d(F.pad(h, (left, right, top, bottom)), wd, bd, stride, groups=wd.size(0)))
    own = h.size(1)
    y = F.conv2d(h, w3[:, :own], b3)
    return (y + x64 if residual else y).float()


# batch, in, expanded, out, height, width, stride, TensorFlow padding: odd sizes (7, 13,
# 15), stride 2 with uneven padding, batch > 1; a residual when stride 1 and in == out
INVERTED_RESIDUALS = [
    (1, 8, 48, 8, 7, 7, 1, True),
    (2, 8, 48, 8, 14, 14, 1, False),
    (1, 8, 48, 16, 15, 15, 2, True),
    (2, 16, 32, 24, 14, 13, 2, True),
    (1, 8, 24, 16, 14, 14, 2, False),
    (1, 8, 16, 8, 60, 62, 1, True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", INVERTED_RESIDUALS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inverted_residual_matches_conv2d(isa, case, channels_last):
    batch, in_c, expanded, out_c, height, width, stride, tf_padding = case
    torch.manual_seed(sum(case))
    padding = same_padding(height, width, 3, stride) if tf_padding else (1, 1, 1, 1)
    residual = stride == 1 and in_c == out_c
    weights, packed, biases, strides, _ = inverted_residual_args(in_c, expanded, out_c, stride, padding)
    x = torch.randn(batch, in_c, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = inverted_residual_reference(x, weights, biases, stride, padding, residual)
    paddings = [0, padding, 0]
    activations = ["relu6", "relu6", "none"]
    for band_rows, split in ((0, None), (1, None), (3, None), (0, True)):
        with torch_threads(3 if split else torch.get_num_threads()):  # depthwise channels in uneven shares
            actual = run_chain(
                x, weights, biases, strides, paddings, activations, residual, band_rows, isa, packed, split
            )
        assert actual.shape == expected.shape
        assert_close_rel(actual, expected, what=f"band_rows={band_rows} split_channels={split}")


def test_inverted_residual_opcheck_and_bad_depthwise_arguments():
    weights, packed, biases, strides, _ = inverted_residual_args(8, 16, 8, 2, (0, 1, 0, 1))
    x = torch.randn(2, 8, 10, 9)
    flat_strides = [s for s in strides for _ in range(2)]
    paddings = [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]
    args = (x, weights, packed, biases, flat_strides, paddings, ["relu6", "relu6", "none"], False, 0)
    torch.library.opcheck(torch.ops.sparsecpu.conv_chain.default, args)

    def chain(*, weights=weights, packed=packed, biases=biases, paddings=(0, (0, 1, 0, 1), 0)):
        return ops.conv_chain(x, weights, packed, biases, strides, list(paddings), ["relu6", "relu6", "none"])

    wrong_channels = [weights[0], torch.randn(12, 1, 3, 3), weights[2]]
    cases = [
        (ValueError, "depthwise.*\\[16, 1, kernel_h, kernel_w\\]", lambda: chain(weights=wrong_channels)),
        (ValueError, "packed\\[0\\] is empty", lambda: chain(packed=[torch.empty(0), *packed[1:]])),
        (
            ValueError,
            "biases\\[1\\] must be a float32 \\[16\\]",
            lambda: chain(biases=[biases[0], torch.randn(3), biases[2]]),
        ),
        (ValueError, "paddings\\[1\\] must be >= 0", lambda: chain(paddings=(0, (0, -1, 0, 1), 0))),
        (TypeError, "paddings\\[1\\] must be ints", lambda: chain(paddings=(0, (0, 1.0, 0, 1), 0))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def mobilenet(sparsity=0.9, seed=0, **config):
    """A small HF MobileNetV2Model (TensorFlow padding by default), random init, every
    ungrouped convolution pruned, non-trivial batch norms."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.MobileNetV2Model(transformers.MobileNetV2Config(depth_multiplier=0.35, **config)).eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            torch_sparsecpu.magnitude_prune_(module, sparsity, layer_types=(nn.Conv2d,))
    return randomize_batch_norms_(model)


@pytest.mark.parametrize("tf_padding", [True, False], ids=["tf_padding", "symmetric_padding"])
@pytest.mark.parametrize("size", [32, 45])
def test_hf_mobilenet_v2_inverted_residuals_are_conv_chains(tf_padding, size):
    model = mobilenet(tf_padding=tf_padding)
    x = torch.randn(2, 3, size, size)
    fused = compile_sparse(model)
    unfused = compile_sparse(model, options={"fuse_layers": False})
    with torch.inference_mode():
        expected = model(x).last_hidden_state
        actual = fused(x).last_hidden_state
        # Every inverted residual with an expansion (16 of 17) is one op; the stem's last
        # 1 x 1 and the final 1 x 1 join the first and last of them: only the stem's
        # 3 x 3 (no chain starts with a k x k layer) stays a conv2d call.
        names = sparse_op_names(fused, x)
        assert names.count("sparsecpu::conv_chain") == 16
        assert names.count("sparsecpu::conv2d") == 1
        assert_close_rel(actual, expected, rel=1e-4, what="fused vs eager")
        assert_close_rel(actual, unfused(x).last_hidden_state, rel=1e-4, what="fused vs fuse_layers=False")


def test_depthwise_weight_and_batch_norm_edits_are_seen():
    model = mobilenet()
    block = model.layer[1]  # stride 1, residual
    x = torch.randn(1, block.expand_1x1.convolution.in_channels, 9, 9)
    compiled = compile_sparse(block, options=EAGER)
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x))
        assert sparse_op_names(compiled, x) == ["sparsecpu::conv_chain"]
    with torch.no_grad():
        block.conv_3x3.convolution.weight.mul_(-1.5)
        block.conv_3x3.normalization.running_mean.add_(0.3)  # in place: no version bump
    with torch.inference_mode():
        assert_close_rel(compiled(x), block(x))
