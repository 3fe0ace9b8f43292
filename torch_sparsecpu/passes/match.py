"""Which calls of a graph are linear or conv2d layers the sparse ops can run, why the
others stay dense, and which activation after a layer can be fused into it.

``torch.addmm(bias, x, weight)`` with a static ``weight`` of shape ``[in, out]`` (GPT-2's
``Conv1D``) is a linear whose weight is transposed: packed as ``weight.t()``, it runs on
``sparsecpu::linear(..., weight_transposed=True)``, which is given the weight as stored
(rewrite.py says why).

A layer is taken when its weight is a static float32 CPU parameter (a graph input
that Dynamo marks as a parameter or buffer, or a ``get_attr`` constant) whose
fraction of exact zeros is at least ``min_sparsity``, and its input is float32.
Convolutions must also be ungrouped (zero padding; any kernel, stride and dilation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ops
from .static import example_value, source_name

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
CONV2D_TARGETS = (torch.conv2d, F.conv2d)
ADDMM_TARGETS = (torch.addmm,)  # addmm(bias, x, weight), weight [in, out]: GPT-2's Conv1D


@dataclasses.dataclass
class LayerDecision:
    """What the backend did with one linear or conv2d call of the graph. For a
    convolution, out_features and in_features are its output and input channels."""

    name: str
    out_features: int
    in_features: int
    sparsity: float | None
    taken: bool
    reason: str
    activation: str = "none"
    block_rows: int = 1  # the packed format's nonzero blocks: 1 x 1, or 4 x 1 (ops.default_block_rows)
    kind: str = "linear"  # or "conv2d"
    batch_norm_folded: bool = False  # the eval-mode batch norm after a convolution, folded into it
    weight_origin: str = ""  # for a weight the graph computes: how ('pruned via torch.nn.utils.prune', ...)
    datatype: str = "f32"  # the packed values: "f32", or "int8" (options={"quantize": "int8"}, ops.int8_pays)

    def __str__(self) -> str:
        sparsity = "   -  " if self.sparsity is None else f"{self.sparsity:6.1%}"
        blocks = "int8, " if self.datatype != "f32" else ""
        blocks += f"{self.block_rows}x1 blocks, " if self.block_rows > 1 else ""
        blocks += "batch norm folded, " if self.batch_norm_folded else ""
        origin = f"{self.weight_origin}, " if self.weight_origin else ""
        what = (
            f"sparse, {origin}{blocks}activation {self.activation}" if self.taken else f"dense: {origin}{self.reason}"
        )
        return f"{self.name:<48} {self.kind:<6} [{self.out_features:>5} x {self.in_features:>5}] {sparsity}  {what}"


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """A linear or conv2d call of the graph: its arguments, and its weight's name and shape."""

    node: fx.Node
    kind: str  # "linear" or "conv2d"
    x: Any
    weight: Any  # a node unless the graph passes a constant
    bias: Any
    name: str  # the weight's name in the model ('encoder.layer.0.output.dense.weight')
    weight_shape: tuple  # its traced shape; () when it has none
    weight_transposed: bool = False  # the graph's weight is [in, out] (an addmm: GPT-2's Conv1D)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), or a convolution's (out_channels, in_channels);
        (0, 0) when the weight has not the expected number of dims."""
        dims = 2 if self.kind == "linear" else 4
        if len(self.weight_shape) != dims:
            return (0, 0)
        return self.weight_shape[1::-1] if self.weight_transposed else self.weight_shape[:2]

    def decision(self, sparsity: float | None, taken: bool, reason: str = "", **fields) -> LayerDecision:
        return LayerDecision(self.name, *self.shape, sparsity, taken, reason, kind=self.kind, **fields)


def match_layer(node: fx.Node, static: dict[fx.Node, torch.Tensor]) -> LayerCall | None:
    """The linear or conv2d call ``node`` is, or None. An ``addmm(bias, x, weight)`` is a
    linear with a transposed weight when ``weight`` is a static tensor and the product is
    not scaled; any other addmm is a matrix product, not a layer."""
    if node.op != "call_function" or node.target not in LINEAR_TARGETS + CONV2D_TARGETS + ADDMM_TARGETS:
        return None
    if node.target in ADDMM_TARGETS:
        args = addmm_layer_args(node)
        if args is None or args[1] not in static:
            return None
        (x, weight, bias), kind, transposed = args, "linear", True
    else:
        kind, transposed = ("linear" if node.target in LINEAR_TARGETS else "conv2d"), False
        x, weight, bias = linear_args(node) if kind == "linear" else conv_args(node)[:3]
    name = source_name(weight) if isinstance(weight, fx.Node) else str(weight)
    value = example_value(weight)
    shape = tuple(value.shape) if value is not None else ()
    return LayerCall(node, kind, x, weight, bias, name, shape, transposed)


def addmm_layer_args(node: fx.Node) -> tuple | None:
    """input, weight ([in, out]), bias of ``addmm(bias, input, weight)``; None when
    ``beta`` or ``alpha`` scales a term."""
    names = ("input", "mat1", "mat2")
    if len(node.args) > 3 or any(node.kwargs.get(scale, 1) != 1 for scale in ("beta", "alpha")):
        return None
    args = list(node.args) + [None] * 3
    bias, x, weight = (node.kwargs.get(name, arg) for name, arg in zip(names, args, strict=False))
    return x, weight, bias


def linear_args(node: fx.Node):
    """input, weight, bias of a linear call."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def conv_args(node: fx.Node):
    """input, weight, bias, stride, padding, dilation, groups of a conv2d call."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    args = list(node.args) + list(defaults[len(node.args) :])
    return [node.kwargs.get(name, arg) for name, arg in zip(names, args, strict=False)]


def int_pair(value) -> tuple | None:
    """(h, w) of an int or a 1- or 2-sequence of ints, else None."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        return tuple(value) * (3 - len(value))
    return None


def conv_geometry(node: fx.Node, weight_shape: tuple) -> tuple[tuple | None, str | None]:
    """(stride, padding, dilation) pairs of a conv2d call the sparse op can run, or
    why it cannot."""
    _, _, _, stride, padding, dilation, groups = conv_args(node)
    if groups != 1:
        return None, f"groups={groups}: only ungrouped convolutions take the sparse path"
    stride, dilation = int_pair(stride), int_pair(dilation)
    if stride is None or dilation is None:
        return None, "stride or dilation not given as ints"
    kernel = weight_shape[2:]
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride 1; an even extent pads unevenly, which the op does not do
        if any(dilation[i] * (kernel[i] - 1) % 2 for i in range(2)):
            return None, "padding='same' with an even kernel extent pads unevenly"
        padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(2))
    elif int_pair(padding) is None:
        return None, f"padding={padding!r} not given as ints"
    else:
        padding = int_pair(padding)
    return (stride, padding, dilation), None


def under_autocast(graph: fx.Graph) -> bool:
    """Autocast entered inside the graph, or around it (Dynamo guards on that state,
    so a change of it recompiles)."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return any(n.op == "call_function" and "autocast" in getattr(n.target, "__name__", "") for n in graph.nodes)


def skip_reason(
    call: LayerCall, static: dict[fx.Node, torch.Tensor], min_sparsity: float, autocast: bool
) -> tuple[str | None, float | None]:
    """Why ``call`` stays dense (None if it need not), and its weight's sparsity where known."""
    weight = static.get(call.weight) if isinstance(call.weight, fx.Node) else None
    if weight is None:
        return "weight is not a static parameter", None
    if weight.dtype != torch.float32:
        return f"weight dtype is {weight.dtype}, only float32 takes the sparse path", None
    dims = 2 if call.kind == "linear" else 4
    if weight.device.type != "cpu" or weight.dim() != dims or weight.is_sparse:
        return f"weight is not a dense {dims}-D CPU tensor", None
    if call.weight_transposed:
        weight = weight.t()  # [out, in], as the sparse ops take it
    if weight.numel() == 0:  # eager gives bias (or zeros); the packed format needs features
        return f"weight of shape {list(weight.shape)} has no elements", None
    x_value = example_value(call.x)
    if x_value is None or x_value.dtype != torch.float32 or x_value.device.type != "cpu":
        dtype = None if x_value is None else x_value.dtype
        return f"input dtype is {dtype}, only float32 CPU inputs take the sparse path", None
    if call.kind == "conv2d" and x_value.dim() != 4:
        return f"input has {x_value.dim()} dims: only batched [N, C, H, W] inputs take the sparse path", None
    if autocast:
        return "the graph runs under autocast", None
    if call.bias is not None:
        bias_value = example_value(call.bias)
        if bias_value is None or bias_value.dtype != torch.float32 or bias_value.dim() != 1:
            return "bias is not a 1-D float32 tensor", None
        if tuple(bias_value.shape) != (weight.shape[0],):  # eager broadcasts a bias of shape [1]
            return (
                f"bias has shape {list(bias_value.shape)}, the sparse ops take [{weight.shape[0]}] "
                f"(one per output {'feature' if call.kind == 'linear' else 'channel'})"
            ), None
    sparsity = 1.0 - ops.nonzero_counts(weight.flatten(1))[0] / max(weight.numel(), 1)
    if sparsity < min_sparsity:
        return f"sparsity {sparsity:.1%} is below min_sparsity {min_sparsity:.1%}", sparsity
    return None, sparsity


def activation_of(node: fx.Node) -> str | None:
    """The fusable activation ``node`` applies to its first argument, if any."""
    target = node.target
    if node.op == "call_method":
        return "relu" if target in ("relu", "relu_") else None
    if node.op != "call_function":
        return None
    if target in (torch.relu, torch.relu_, F.relu, torch.nn.functional.relu_):
        return "relu"
    if target in (F.silu, torch._C._nn.silu):
        return "silu"
    if target in (F.relu6, torch._C._nn.relu6):
        return "relu6"
    if target in (F.hardswish, torch._C._nn.hardswish):
        return "hardswish"
    if target is F.hardtanh:  # nn.ReLU6 is hardtanh(x, 0, 6)
        bounds = [
            node.kwargs.get(name, node.args[i] if len(node.args) > i else default)
            for i, name, default in ((1, "min_val", -1.0), (2, "max_val", 1.0))
        ]
        return "relu6" if bounds == [0, 6] else None
    if target in (F.gelu, torch._C._nn.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def fusable_activation(output: fx.Node) -> tuple[fx.Node | None, str]:
    """The activation node that is the only user of ``output`` and applies to it, and its
    name; (None, "none") if there is none."""
    users = list(output.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is output:
        activation = activation_of(users[0])
        if activation is not None:
            return users[0], activation
    return None, "none"
