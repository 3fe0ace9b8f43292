"""1 x 1 convolutions: the sparsecpu::conv1x1 op against F.conv2d, its gradients, and
what the backend rewrites (and leaves dense) in convolutional models."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import torch_sparsecpu
from torch_sparsecpu import ops

from conftest import assert_close_rel, sparse_weight

CONV_CALL = re.compile(r"= torch\.ops\.sparsecpu\.conv1x1\.default\(")
ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu}


def conv_weight(out_channels: int, in_channels: int, sparsity: float) -> torch.Tensor:
    return sparse_weight(out_channels, in_channels, sparsity).view(out_channels, in_channels, 1, 1)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as NCHW, channels-last and an arbitrary strided view."""
    return {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
    }


@pytest.mark.parametrize("isa", torch_sparsecpu.available_isas())
@pytest.mark.parametrize("shape", [
    # batch, in, out, height, width: one pixel, fewer pixels than a register, a panel and
    # a bit, several images, channels that fill no register or tile evenly
    (1, 16, 32, 1, 1), (1, 7, 5, 1, 7), (2, 64, 24, 9, 8), (3, 33, 65, 13, 11), (1, 130, 4, 3, 30),
])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv1x1_matches_conv2d(isa, shape, stride):
    batch, in_channels, out_channels, height, width = shape
    weight = conv_weight(out_channels, in_channels, 0.8)
    bias = torch.randn(out_channels)
    packed = ops.pack_linear(weight.flatten(1))
    with torch_sparsecpu.force_isa(isa):
        for layout, x in layouts(torch.randn(batch, in_channels, height, width)).items():
            for activation, apply in ACTIVATIONS.items():
                expected = apply(F.conv2d(x, weight, bias, stride))
                actual = ops.conv1x1(x, weight, packed, bias, stride, activation)
                what = f"{isa} {layout} {activation}"
                assert actual.shape == expected.shape, what
                # Channels-last in, channels-last out, like F.conv2d.
                assert actual.stride() == expected.stride(), what
                assert_close_rel(actual, expected, what=what)


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_conv1x1_dense_and_empty_weights(sparsity):
    weight = conv_weight(12, 20, sparsity)
    x = torch.randn(2, 20, 5, 6)
    actual = ops.conv1x1(x, weight, ops.pack_linear(weight.flatten(1)), None, 1, "relu")
    assert_close_rel(actual, F.relu(F.conv2d(x, weight)))


def test_conv1x1_empty_batch_and_image():
    weight = conv_weight(8, 4, 0.5)
    packed = ops.pack_linear(weight.flatten(1))
    assert ops.conv1x1(torch.randn(0, 4, 3, 3), weight, packed).shape == (0, 8, 3, 3)
    assert ops.conv1x1(torch.randn(2, 4, 0, 5), weight, packed).shape == (2, 8, 0, 5)  # F.conv2d refuses it


def conv_samples():
    weight = conv_weight(24, 16, 0.9)
    packed = ops.pack_linear(weight.flatten(1))
    x = torch.randn(2, 16, 7, 6)
    yield x, weight, packed, torch.randn(24), 1, "gelu"
    yield x.contiguous(memory_format=torch.channels_last), weight, packed, None, 2, "relu"


@pytest.mark.parametrize("args", list(conv_samples()), ids=["nchw", "channels_last"])
def test_opcheck_conv1x1(args):
    torch.library.opcheck(torch.ops.sparsecpu.conv1x1.default, args)
    x, weight, packed, bias, stride, activation = args
    grads = (x.clone().requires_grad_(), weight.clone().requires_grad_(),
             packed, None if bias is None else bias.clone().requires_grad_(), stride, activation)
    torch.library.opcheck(torch.ops.sparsecpu.conv1x1.default, grads)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("stride", [1, 2])
def test_conv1x1_gradients_match_dense(activation, stride):
    weight = conv_weight(24, 16, 0.9).requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(2, 16, 7, 6, requires_grad=True)
    packed = ops.pack_linear(weight.detach().flatten(1))
    sparse = ops.conv1x1(x, weight, packed, bias, stride, activation)
    dense = ACTIVATIONS[activation](F.conv2d(x, weight, bias, stride))
    grad = torch.randn_like(dense)
    for got, want, name in zip(torch.autograd.grad(sparse, (x, weight, bias), grad),
                               torch.autograd.grad(dense, (x, weight, bias), grad), ("input", "weight", "bias")):
        assert_close_rel(got, want, rel=1e-4, what=f"grad of {name}")


def test_conv1x1_bad_arguments():
    weight = conv_weight(8, 4, 0.5)
    packed = ops.pack_linear(weight.flatten(1))
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv1x1(x, weight, packed, stride=0)
    with pytest.raises(TypeError, match="stride must be an int"):
        ops.conv1x1(x, weight, packed, stride=(1, 1))
    with pytest.raises(ValueError, match=r"input must be \[batch, 4, height, width\]"):
        ops.conv1x1(torch.randn(1, 5, 3, 3), weight, packed)
    with pytest.raises(ValueError, match="weight must be"):
        ops.conv1x1(x, weight.view(8, 4), packed)
    with pytest.raises(ValueError, match="bias must be float32 of shape"):
        ops.conv1x1(x, weight, packed, torch.randn(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.conv1x1(x, weight, packed, activation="tanh")


class ConvNet(nn.Module):
    """1 x 1 convolutions (one with stride 2, one followed by ReLU, one by batch norm)
    among layers that stay dense: a 3 x 3, a grouped and a padded 1 x 1 convolution."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.spatial = nn.Conv2d(64, 64, 3, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 1, groups=64)
        self.project = nn.Conv2d(64, 32, 1, stride=2, bias=False)
        self.norm = nn.BatchNorm2d(32)
        self.padded = nn.Conv2d(32, 32, 1, padding=1)
        self.head = nn.Conv2d(32, 8, (1, 1))

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


def test_explain_takes_only_plain_1x1_convolutions():
    model = conv_net()
    decisions = {d.name: d for d in torch_sparsecpu.explain(model, torch.randn(2, 16, 10, 10))}
    assert {name for name, d in decisions.items() if d.taken} == {"expand.weight", "project.weight", "head.weight"}
    assert decisions["expand.weight"].activation == "relu"
    assert decisions["expand.weight"].kind == "conv2d"
    assert (decisions["expand.weight"].out_features, decisions["expand.weight"].in_features) == (64, 16)
    assert "3 x 3 kernel" in decisions["spatial.weight"].reason
    assert "groups=64" in decisions["depthwise.weight"].reason
    assert "padding" in decisions["padded.weight"].reason
    assert "conv2d" in str(decisions["head.weight"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_net_compiled_with_inductor_matches_eager(channels_last):
    model = conv_net()
    x = torch.randn(2, 16, 10, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        actual, code = run_and_get_code(torch.compile(model, backend="sparsecpu"), x)
    assert sum(len(CONV_CALL.findall(c)) for c in code) == 3
    assert_close_rel(actual, expected)


def test_conv_net_gradients_through_compiled_model():
    model = conv_net()
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": "eager"})
    grad = torch.randn(2, 8, 7, 7)
    sparse = torch.autograd.grad(compiled(x), (x, model.expand.weight, model.head.bias), grad)
    dense = torch.autograd.grad(model(x), (x, model.expand.weight, model.head.bias), grad)
    for got, want in zip(sparse, dense):
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


def test_hf_resnet_bottleneck_convolutions_run_sparse():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                       layer_type="bottleneck")
    model = transformers.ResNetModel(config).eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9, layer_types=(nn.Conv2d,))
    x = torch.randn(1, 3, 64, 64)
    decisions = torch_sparsecpu.explain(model, x)
    one_by_one = [d for d in decisions if "kernel" not in d.reason]
    # Each bottleneck layer: reduce and expand 1 x 1 convolutions and a 1 x 1 shortcut.
    assert len(one_by_one) == 6 and all(d.taken for d in one_by_one)
    with torch.no_grad():
        expected = model(x).last_hidden_state
        actual = torch.compile(model, backend="sparsecpu")(x).last_hidden_state
    assert_close_rel(actual, expected, rel=1e-4)
