"""Convolutions: the sparsecpu::conv2d op against F.conv2d, its gradients, and what
the backend rewrites (and leaves dense) in convolutional models."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import torch_sparsecpu
from torch_sparsecpu import ops

from conftest import ACTIVATION_REFERENCE as ACTIVATIONS, assert_close_rel, sparse_weight

# ConvNet's head pads 'same' with an even kernel on purpose (it stays dense).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def conv_weight(out_channels: int, in_channels: int, sparsity: float, kernel=(1, 1)) -> torch.Tensor:
    return sparse_weight(out_channels, in_channels * kernel[0] * kernel[1], sparsity).view(
        out_channels, in_channels, *kernel
    )


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as NCHW, channels-last, every other image of a channels-last
    batch (strides channels-last-like but not dense) and an arbitrary strided view."""
    doubled = torch.cat([x, torch.randn_like(x)], dim=1).reshape(2 * x.size(0), *x.shape[1:])
    return {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "channels_last_every_other": doubled.contiguous(memory_format=torch.channels_last)[::2],
        "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
    }


def check_against_conv2d(isa, shape, kernel, stride, padding=(0, 0), dilation=(1, 1)):
    batch, in_channels, out_channels, height, width = shape
    weight = conv_weight(out_channels, in_channels, 0.8, kernel)
    bias = torch.randn(out_channels)
    packed = ops.pack_linear(weight.flatten(1))
    with torch_sparsecpu.force_isa(isa):
        for layout, x in layouts(torch.randn(batch, in_channels, height, width)).items():
            for activation, apply in ACTIVATIONS.items():
                expected = apply(F.conv2d(x, weight, bias, stride, padding, dilation))
                actual = ops.conv2d(x, weight, packed, bias, stride, padding, dilation, activation)
                what = f"{isa} {layout} {activation}"
                assert actual.shape == expected.shape, what
                # Channels-last in, channels-last out, like F.conv2d.
                assert actual.stride() == expected.stride(), what
                assert_close_rel(actual, expected, what=what)


# batch, in, out, height, width: one pixel, fewer pixels than a register, a panel and
# a bit, several images, channels that fill no register or tile evenly
SHAPES = [(1, 16, 32, 1, 1), (1, 7, 5, 1, 7), (2, 64, 24, 9, 8), (3, 33, 65, 13, 11), (1, 130, 4, 3, 30)]


@pytest.mark.parametrize("isa", torch_sparsecpu.available_isas())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [1, 2, (3, 1)])
def test_1x1_conv_matches_conv2d(isa, shape, stride):
    check_against_conv2d(isa, shape, (1, 1), stride)


@pytest.mark.parametrize("isa", torch_sparsecpu.available_isas())
@pytest.mark.parametrize(
    "shape,stride",
    [
        # One output column (or row): the strided view's size-1 dimension keeps the stride
        # of the step, even where PyTorch calls the view contiguous (found by test_fuzz).
        ((2, 3, 4, 5, 1), (1, 2)),
        ((1, 4, 6, 3, 1), (2, 2)),
        ((2, 3, 4, 1, 5), (2, 1)),
    ],
)
def test_1x1_conv_with_one_output_column_or_row(isa, shape, stride):
    check_against_conv2d(isa, shape, (1, 1), stride)


@pytest.mark.parametrize("isa", torch_sparsecpu.available_isas())
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [
        ((3, 3), 1, 1, 1),
        ((3, 3), 2, 1, 1),
        ((3, 3), 1, 0, 1),
        ((1, 3), 1, (0, 1), 1),
        ((3, 3), 1, 2, 2),
        ((2, 2), (1, 2), (1, 0), 1),
        ((5, 5), 2, 2, 1),
        ((1, 1), 1, 1, 1),
    ],
)
def test_kxk_conv_matches_conv2d(isa, shape, kernel, stride, padding, dilation):
    batch, in_channels, _, height, width = shape
    padding, dilation = _pair(padding), _pair(dilation)
    if (
        min(
            height + 2 * padding[0] - (kernel[0] - 1) * dilation[0],
            width + 2 * padding[1] - (kernel[1] - 1) * dilation[1],
        )
        < 1
    ):
        # The image is smaller than the kernel: refused, as F.conv2d does.
        weight = conv_weight(4, in_channels, 0.5, kernel)
        with pytest.raises(ValueError, match="is smaller than the"):
            ops.conv2d(
                torch.randn(batch, in_channels, height, width),
                weight,
                ops.pack_linear(weight.flatten(1)),
                None,
                stride,
                padding,
                dilation,
            )
        return
    check_against_conv2d(isa, shape, kernel, stride, padding, dilation)


def _pair(value):
    return (value, value) if isinstance(value, int) else value


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_conv2d_dense_and_empty_weights(sparsity):
    weight = conv_weight(12, 20, sparsity, (3, 3))
    x = torch.randn(2, 20, 5, 6)
    actual = ops.conv2d(x, weight, ops.pack_linear(weight.flatten(1)), None, activation="relu")
    assert_close_rel(actual, F.relu(F.conv2d(x, weight)))


def test_conv2d_empty_batch_and_too_small_images():
    weight = conv_weight(8, 4, 0.5, (3, 3))
    packed = ops.pack_linear(weight.flatten(1))
    assert ops.conv2d(torch.randn(0, 4, 3, 3), weight, packed).shape == (0, 8, 1, 1)
    for shape in [(1, 4, 2, 2), (2, 4, 0, 5)]:  # as F.conv2d, an empty image is refused too
        with pytest.raises(ValueError, match="smaller than the 3 x 3 kernel"):
            ops.conv2d(torch.randn(shape), weight, packed)


def conv_samples():
    weight = conv_weight(24, 16, 0.9, (3, 3))
    packed = ops.pack_linear(weight.flatten(1))
    x = torch.randn(2, 16, 7, 6)
    yield x, weight, packed, torch.randn(24), [1, 1], [1, 1], [1, 1], "gelu"
    yield x.contiguous(memory_format=torch.channels_last), weight, packed, None, [2, 1], [0, 1], [1, 2], "relu"
    pointwise = conv_weight(24, 16, 0.9)
    yield x, pointwise, ops.pack_linear(pointwise.flatten(1)), None, [2, 2], [0, 0], [1, 1], "silu"


@pytest.mark.parametrize("args", list(conv_samples()), ids=["3x3", "3x3-channels_last", "1x1-stride2"])
def test_opcheck_conv2d(args):
    torch.library.opcheck(torch.ops.sparsecpu.conv2d.default, args)
    x, weight, packed, bias, *rest = args
    grads = (
        x.clone().requires_grad_(),
        weight.clone().requires_grad_(),
        packed,
        None if bias is None else bias.clone().requires_grad_(),
        *rest,
    )
    torch.library.opcheck(torch.ops.sparsecpu.conv2d.default, grads)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("kernel,stride,padding", [((1, 1), 2, 0), ((3, 3), 1, 1), ((3, 3), 2, (0, 1))])
def test_conv2d_gradients_match_dense(activation, kernel, stride, padding):
    weight = conv_weight(24, 16, 0.9, kernel).requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(2, 16, 7, 6, requires_grad=True)
    packed = ops.pack_linear(weight.detach().flatten(1))
    sparse = ops.conv2d(x, weight, packed, bias, stride, padding, activation=activation)
    dense = ACTIVATIONS[activation](F.conv2d(x, weight, bias, stride, padding))
    grad = torch.randn_like(dense)
    for got, want, name in zip(
        torch.autograd.grad(sparse, (x, weight, bias), grad),
        torch.autograd.grad(dense, (x, weight, bias), grad),
        ("input", "weight", "bias"),
        strict=True,
    ):
        assert_close_rel(got, want, rel=1e-4, what=f"grad of {name}")


def test_conv2d_bad_arguments():
    weight = conv_weight(8, 4, 0.5)
    packed = ops.pack_linear(weight.flatten(1))
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv2d(x, weight, packed, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ops.conv2d(x, weight, packed, padding=(0, -1))
    with pytest.raises(TypeError, match="dilation must be an int or a pair of ints"):
        ops.conv2d(x, weight, packed, dilation=(1, 1, 1))
    with pytest.raises(ValueError, match=r"input must be \[batch, 4, height, width\]"):
        ops.conv2d(torch.randn(1, 5, 3, 3), weight, packed)
    with pytest.raises(ValueError, match="weight must be"):
        ops.conv2d(x, weight.view(8, 4), packed)
    with pytest.raises(ValueError, match="does not match the packed weight"):
        ops.conv2d(x, conv_weight(8, 4, 0.5, (3, 3)), packed)
    with pytest.raises(ValueError, match="bias must be float32 of shape"):
        ops.conv2d(x, weight, packed, torch.randn(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.conv2d(x, weight, packed, activation="tanh")


class ConvNet(nn.Module):
    """Convolutions the backend runs sparse (1 x 1 with ReLU, 3 x 3 padded, 1 x 1 with
    stride 2 before a batch norm, 1 x 1 padded) and two it leaves dense: a grouped one
    and a 2 x 2 one whose padding='same' pads unevenly."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.spatial = nn.Conv2d(64, 64, 3, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 32, 1, stride=2, bias=False)
        self.norm = nn.BatchNorm2d(32)
        self.padded = nn.Conv2d(32, 32, 1, padding=1)
        self.head = nn.Conv2d(32, 8, 2, padding="same")

    def forward(self, x):
        x = F.relu(self.expand(x))
        x = self.depthwise(self.spatial(x))
        x = self.norm(self.project(x))
        return self.head(self.padded(x))


def conv_net(sparsity=0.9):
    model = ConvNet().eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    return torch_sparsecpu.magnitude_prune_(model, sparsity, layer_types=(nn.Conv2d,))


def test_explain_takes_ungrouped_evenly_padded_convolutions():
    model = conv_net()
    decisions = {d.name: d for d in torch_sparsecpu.explain(model, torch.randn(2, 16, 10, 10))}
    taken = {"expand.weight", "spatial.weight", "project.weight", "padded.weight"}
    assert {name for name, d in decisions.items() if d.taken} == taken
    assert decisions["expand.weight"].activation == "relu"
    assert decisions["spatial.weight"].kind == "conv2d"
    # A convolution's in_features counts its input channels (the packed matrix has 9x more columns).
    assert (decisions["spatial.weight"].out_features, decisions["spatial.weight"].in_features) == (64, 64)
    assert "groups=64" in decisions["depthwise.weight"].reason
    assert "pads unevenly" in decisions["head.weight"].reason
    assert "conv2d" in str(decisions["head.weight"])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fuse_layers", [False, True])
def test_conv_net_compiled_with_inductor_matches_eager(channels_last, fuse_layers):
    model = conv_net()
    x = torch.randn(2, 16, 10, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="sparsecpu", options={"fuse_layers": fuse_layers})
    with torch.no_grad():
        expected = model(x)
        actual, code = run_and_get_code(compiled, x)
    # Fused: expand -> spatial -> depthwise (dense, inside the chain) -> project -> padded,
    # one conv_chain call.
    calls = {"conv2d": 0 if fuse_layers else 4, "conv_chain": 1 if fuse_layers else 0}
    for op, count in calls.items():
        assert sum(c.count(f"torch.ops.sparsecpu.{op}.default(") for c in code) == count, op
    assert_close_rel(actual, expected)


def test_conv_net_gradients_through_compiled_model():
    model = conv_net()
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    grad = torch.randn(2, 8, 7, 7)
    sparse = torch.autograd.grad(compiled(x), (x, model.expand.weight, model.head.bias), grad)
    dense = torch.autograd.grad(model(x), (x, model.expand.weight, model.head.bias), grad)
    for got, want in zip(sparse, dense, strict=True):
        assert_close_rel(got, want, rel=1e-4)


def test_conv_weights_edited_after_compiling_are_honoured():
    model = conv_net()
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x))
        model.head.weight.mul_(3)
        model.expand.weight[0].zero_()
        assert_close_rel(compiled(x), model(x), what="after in-place edits")


def test_hf_resnet_convolutions_run_sparse():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck")
    model = transformers.ResNetModel(config).eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9, layer_types=(nn.Conv2d,))
    x = torch.randn(1, 3, 64, 64)
    decisions = torch_sparsecpu.explain(model, x)
    # The 7 x 7 stem, and per bottleneck layer 1 x 1 reduce, 3 x 3, 1 x 1 expand and a 1 x 1 shortcut.
    assert len(decisions) == 9 and all(d.taken for d in decisions)
    with torch.no_grad():
        expected = model(x).last_hidden_state
        actual = torch.compile(model, backend="sparsecpu")(x).last_hidden_state
    assert_close_rel(actual, expected, rel=1e-4)


def test_batch_norm_folded_into_the_sparse_convolution_before_it():
    model = conv_net()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        folded = {d.name for d in torch_sparsecpu.explain(model, x) if d.batch_norm_folded}
        assert folded == {"project.weight"}
        expected = model(x)
        actual, code = run_and_get_code(torch.compile(model, backend="sparsecpu"), x)
    assert_close_rel(actual, expected)
    assert not any("batch_norm" in c for c in code)  # the only batch norm is gone from the graph
    # Not folded when asked not to, nor when the graph is compiled for gradients.
    no_fold = torch_sparsecpu.explain(model, x, fold_batch_norm=False)
    assert not any(d.batch_norm_folded for d in no_fold)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    y = compiled(x.requires_grad_())
    grad = torch.autograd.grad(y.sum(), model.norm.weight)[0]
    assert_close_rel(grad, torch.autograd.grad(model(x).sum(), model.norm.weight)[0], rel=1e-4)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("edit", ["running_var", "bn_weight", "conv_weight", "load_state_dict"])
def test_folded_batch_norm_edits_are_honoured(inner, edit):
    model = conv_net()
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), what="before the edit")
        if edit == "running_var":
            model.norm.running_var.mul_(3)
        elif edit == "bn_weight":
            model.norm.weight.add_(1)
        elif edit == "conv_weight":
            model.project.weight.mul_(2)
        else:
            model.load_state_dict(conv_net().state_dict())
        assert_close_rel(compiled(x), model(x), what=f"after editing {edit}")


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_batch_norm_recalibrated_after_compiling_is_honoured(inner):
    """A training-mode forward updates running statistics in place without bumping their
    version: the backend compares the folded values on every call."""
    model = conv_net()
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), what="before recalibration")
        model.train()
        model(3 * x + 1)  # new running statistics, versions unchanged
        model.eval()
        assert_close_rel(compiled(x), model(x), what="after recalibration")


def test_nan_statistic_does_not_rebuild_on_every_call(caplog):
    """Folded statistics are compared bit for bit: a NaN equals itself (torch.equal would
    call the build stale on every call)."""
    model = conv_net()
    with torch.no_grad():
        model.norm.running_var[0] = float("nan")
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="torch_sparsecpu.backend"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), equal_nan=True)
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="torch_sparsecpu.backend"):
        model.norm.running_var[1] = float("nan")  # a real change still rebuilds
        torch.testing.assert_close(compiled(x), model(x), equal_nan=True)
    assert [r for r in caplog.records if "rebuilding" in r.getMessage()]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_rebuild_folds_the_real_batch_norm_statistics(inner):
    """A rebuild compiles with the model's real buffers: a convolution that was dense at
    first and sparse after the edit folds the actual running statistics."""
    model = conv_net()
    with torch.no_grad():
        model.project.weight.normal_()  # dense at compile time: its batch norm stays
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), what="before the edit")
        torch_sparsecpu.magnitude_prune_(model, 0.95, layer_types=(nn.Conv2d,))  # new nonzero counts: rebuild
        assert_close_rel(compiled(x), model(x), what="first call after the edit")


class GradInside(nn.Module):
    """A forward that switches grad mode on itself."""

    def __init__(self):
        super().__init__()
        self.net = conv_net()

    def forward(self, x):
        with torch.enable_grad():
            return self.net(x)


def test_grad_enabled_inside_the_forward_keeps_batch_norms_and_gradients():
    model = GradInside().eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert not any(d.batch_norm_folded for d in torch_sparsecpu.explain(model, x))
        compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
        expected, actual = model(x), compiled(x)
    assert actual.requires_grad and expected.requires_grad
    assert_close_rel(actual, expected)
    grads = [torch.autograd.grad(y.sum(), model.net.norm.weight)[0] for y in (actual, expected)]
    assert_close_rel(*grads, rel=1e-4)
