"""Fuse runs of sparse convolutions that feed each other into one ``sparsecpu::conv_chain``
call (inference graphs only: the chain op has no autograd formula).

A chain is ``conv -> conv (-> conv ...)`` where each ``sparsecpu::conv2d`` (its batch norm
and activation already folded in by rewrite.py) is the only user of the one before, and
the first is a 1 x 1 convolution without padding: a ResNet bottleneck's
``1x1 -> 3x3 -> 1x1``. When the last one (1 x 1, no activation) feeds a residual add of the
chain's input (identity shortcut) or of a 1 x 1 sparse convolution of it (projection
shortcut, at the chain's stride), the add and the activation after it join the chain: the
op adds the chain's input to the last layer's output before the final activation
(identity), or the last layer also reads the chain's input through the concatenated
weight ``[W_last | W_shortcut]`` with the sum of both biases (projection; see
csrc/ops/conv_chain.cpp).

A MobileNet inverted residual, ``1x1 -> depthwise k x k -> 1x1 (+ input)``, is a chain too:
its depthwise convolution (groups = channels, a static float32 weight; zero ``F.pad``
before it, as HF MobileNetV2's TensorFlow padding adds, batch norm and activation after
it) stays dense but runs inside the chain (an empty packed entry marks it), its batch
norm folded into it. ``F.pad`` calls that pad nothing before sparse convolutions are
dropped first: they only copy.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from .. import ops
from .batch_norm import BatchNormFold, batch_norm_after, fold_batch_norm
from .match import CONV2D_TARGETS, conv_args, fusable_activation, int_pair
from .rewrite import RewriteResult, pack_weight, watch_fold
from .static import example_value

log = logging.getLogger(__name__)

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_", "__iadd__")
PAD_TARGETS = (torch.nn.functional.pad, torch._C._nn.pad)


@dataclasses.dataclass
class _Layer:
    """A sparsecpu::conv2d call's arguments, by name."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    packed: fx.Node
    bias: fx.Node | None
    stride: tuple
    padding: tuple
    dilation: tuple
    activation: str
    kernel: tuple
    # A dense depthwise layer: its nodes (zero pad, conv, batch norm, activation; those
    # there) and its batch norm fold. padding is then (top, bottom, left, right).
    depthwise_nodes: tuple = ()
    fold: BatchNormFold | None = None

    @property
    def depthwise(self) -> bool:
        return bool(self.depthwise_nodes)

    def is_pointwise(self) -> bool:
        return self.kernel == (1, 1) and tuple(self.padding) == (0, 0)


@dataclasses.dataclass
class _Residual:
    """The residual add after a chain, its shortcut (None: identity) and the activation after it."""

    add: fx.Node
    shortcut: _Layer | None
    activation_node: fx.Node | None
    activation: str


def _layer(node, values: Callable[[fx.Node], torch.Tensor]) -> _Layer | None:
    """The sparsecpu::conv2d call ``node`` is (without dilation), or None."""
    if not isinstance(node, fx.Node) or node.target is not torch.ops.sparsecpu.conv2d.default:
        return None
    x, weight, packed, bias, stride, padding, dilation, activation = node.args
    kernel = tuple(values(weight).shape[2:])
    layer = _Layer(node, x, weight, packed, bias, tuple(stride), tuple(padding), tuple(dilation), activation, kernel)
    return layer if layer.dilation == (1, 1) else None


def _zero_pad(node) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of an ``F.pad`` call that pads the last two dims of a
    4-D tensor with zeros, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in PAD_TARGETS:
        return None
    names, defaults = ("input", "pad", "mode", "value"), (None, None, "constant", None)
    args = list(node.args) + list(defaults[len(node.args) :])
    _, pad, mode, value = (node.kwargs.get(name, arg) for name, arg in zip(names, args, strict=False))
    is_ints = isinstance(pad, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in pad)
    if not is_ints or len(pad) != 4 or min(pad) < 0 or mode != "constant" or value not in (None, 0, 0.0):
        return None
    return tuple(pad)


def _drop_empty_pads(graph: fx.Graph) -> None:
    """Drops ``F.pad`` calls that pad nothing and feed only sparse convolutions (they
    copy their input, which those never write)."""
    for node in list(graph.nodes):
        pad = _zero_pad(node)
        feeds_sparse = all(user.target is torch.ops.sparsecpu.conv2d.default for user in node.users)
        if pad == (0, 0, 0, 0) and node.users and feeds_sparse:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _depthwise_layer(node, static: dict[fx.Node, torch.Tensor]) -> _Layer | None:
    """The dense depthwise layer starting at ``node``: ``[F.pad ->] conv2d(groups=C) [->
    batch norm] [-> activation]`` with a static float32 ``[C, 1, kh, kw]`` weight, zero
    padding and no dilation, or None."""
    pad = _zero_pad(node)
    conv = _only_user(node) if pad is not None else node
    if not isinstance(conv, fx.Node) or conv.op != "call_function" or conv.target not in CONV2D_TARGETS:
        return None
    x, weight, bias, stride, padding, dilation, groups = conv_args(conv)
    if pad is not None and x is not node:
        return None
    weight_value, x_value = static.get(weight), example_value(x)
    if weight_value is None or x_value is None or x_value.dim() != 4 or weight_value.dtype != torch.float32:
        return None
    channels = x_value.size(1)
    if tuple(weight_value.shape[:2]) != (channels, 1) or groups != channels or channels == 1:
        return None
    if bias is not None and (bias not in static or static[bias].dtype != torch.float32):
        return None
    stride, padding, dilation = int_pair(stride), int_pair(0 if padding == "valid" else padding), int_pair(dilation)
    if stride is None or padding is None or dilation != (1, 1):
        return None
    left, right, top, bottom = pad or (0, 0, 0, 0)
    sides = (top + padding[0], bottom + padding[0], left + padding[1], right + padding[1])
    fold = batch_norm_after(conv, bias, static)
    last = conv if fold is None else fold.node
    activation_node, activation = fusable_activation(last)
    nodes = tuple(n for n in (node if pad is not None else None, conv, fold and fold.node, activation_node) if n)
    kernel = tuple(weight_value.shape[2:])
    x = node.args[0] if pad is not None else x
    return _Layer(
        nodes[-1], x, weight, None, bias, stride, sides, (1, 1), activation, kernel, depthwise_nodes=nodes, fold=fold
    )


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _same_shape(a, b) -> bool:
    va, vb = example_value(a), example_value(b)
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape)


def _added(add: fx.Node, node: fx.Node):
    """The other operand of ``add`` when it adds ``node`` to a tensor (no alpha), else None."""
    is_add = (add.op == "call_function" and add.target in ADD_FUNCTIONS) or (
        add.op == "call_method" and add.target in ADD_METHODS
    )
    if not is_add or len(add.args) != 2 or add.kwargs:
        return None
    first, second = add.args
    other = second if first is node else first if second is node else None
    return other if isinstance(other, fx.Node) and other is not node else None


def _residual_after(chain: list[_Layer], values) -> _Residual | None:
    """The residual add the chain's last layer feeds, if its shortcut is the chain's input
    or a 1 x 1 sparse convolution of it at the chain's stride."""
    last, x = chain[-1], chain[0].x
    add = _only_user(last.node)
    if add is None or last.activation != "none" or not last.is_pointwise() or tuple(last.stride) != (1, 1):
        return None
    other = _added(add, last.node)
    if other is None or not _same_shape(add, last.node):
        return None
    shortcut = None
    if other is not x:
        shortcut = _layer(other, values)
        stride = tuple(int(torch.tensor([layer.stride[i] for layer in chain]).prod()) for i in range(2))
        if (
            shortcut is None
            or shortcut.x is not x
            or not shortcut.is_pointwise()
            or shortcut.activation != "none"
            or shortcut.stride != stride
            or _only_user(shortcut.node) is not add
        ):
            return None
    if not _same_shape(other, add):
        return None
    activation_node, activation = fusable_activation(add)
    return _Residual(add, shortcut, activation_node, activation)


def _chains(graph: fx.Graph, values, static) -> list[tuple[list[_Layer], _Residual | None]]:
    """Maximal runs of sparse convolutions (dense depthwise ones between them), each the
    only user of the one before and the first 1 x 1 without padding, with the residual
    add after them if any. (Graph order is topological: a run's first 1 x 1 layer is met
    before the others.)"""
    found = []
    taken: set[fx.Node] = set()
    for node in graph.nodes:
        layer = _layer(node, values)
        if layer is None or node in taken or not layer.is_pointwise():
            continue
        chain = [layer]
        while True:
            user = _only_user(chain[-1].node)
            nxt = _layer(user, values) or (None if user is None else _depthwise_layer(user, static))
            if nxt is None or nxt.x is not chain[-1].node:
                break
            chain.append(nxt)
        while chain[-1].depthwise:  # a depthwise layer runs only between sparse ones
            chain.pop()
        residual = _residual_after(chain, values)
        if len(chain) > 1 or residual is not None:
            found.append((chain, residual))
            taken.update(layer.node for layer in chain)
    return found


def fuse_conv_chains(
    graph: fx.Graph,
    result: RewriteResult,
    static: dict[fx.Node, torch.Tensor],
    pack: Callable[[torch.Tensor], torch.Tensor] = ops.pack_linear,
) -> list[int]:
    """Replaces each chain of sparse convolutions (with its residual add and activation)
    by one ``sparsecpu::conv_chain`` call; a residual's concatenated weight is packed
    and added to ``result`` (its live sources watched). Returns the number of layers of
    each chain, the shortcut counted. Only for inference graphs."""

    def values(node):
        return result.attributes[node.target] if node.op == "get_attr" else static[node]

    _drop_empty_pads(graph)
    lengths = []
    for chain, residual in _chains(graph, values, static):
        for layer in chain:
            if layer.depthwise:
                _prepare_depthwise(graph, layer, result, static)
        weights = [layer.weight for layer in chain]
        packed = [layer.packed for layer in chain]
        biases = [layer.bias for layer in chain]
        activations = [layer.activation for layer in chain]
        replaced = chain[-1].node
        if residual is not None:
            replaced = residual.activation_node or residual.add
            if residual.shortcut is not None:  # a projection: [W_last | W_shortcut]
                with graph.inserting_before(replaced):
                    weights[-1], packed[-1], biases[-1] = _residual_layer(
                        graph, chain[-1], residual.shortcut, result, values, pack
                    )
            activations[-1] = residual.activation
        strides = [v for layer in chain for v in layer.stride]
        if any(layer.depthwise for layer in chain):  # (top, bottom, left, right) per layer
            paddings = [v for layer in chain for v in _sides(layer)]
        else:  # (height, width) per layer
            paddings = [v for layer in chain for v in layer.padding]
        with graph.inserting_before(replaced):
            fused = graph.call_function(
                torch.ops.sparsecpu.conv_chain.default,
                # The input as it is now: an earlier chain may have replaced the node it was.
                (chain[0].node.args[0], weights, packed, biases, strides, paddings, activations, residual is not None),
            )
        fused.meta = dict(replaced.meta)
        replaced.replace_all_uses_with(fused)
        erased = [node for layer in reversed(chain) for node in reversed(layer.depthwise_nodes or (layer.node,))]
        if residual is not None:
            erased = [residual.activation_node, residual.add, getattr(residual.shortcut, "node", None), *erased]
        for node in erased:
            if node is not None:
                graph.erase_node(node)
        lengths.append(len(chain) + (residual is not None and residual.shortcut is not None))
        log.debug("sparsecpu: %d sparse convolutions fused into one conv_chain", lengths[-1])
    _drop_unused_attributes(graph, result)
    graph.lint()
    return lengths


def _sides(layer: _Layer) -> tuple:
    """A layer's padding as (top, bottom, left, right)."""
    if layer.depthwise:
        return layer.padding
    return (layer.padding[0], layer.padding[0], layer.padding[1], layer.padding[1])


def _prepare_depthwise(graph: fx.Graph, layer: _Layer, result: RewriteResult, static) -> None:
    """Points a depthwise layer's weight and bias at what the chain reads and its packed
    entry at an empty tensor. Without a batch norm they are the graph's own (the op reads
    them at every call); with one, its folded copies, watched through their sources."""
    attr = f"_sparsecpu_depthwise_{len(result.attributes)}"
    result.attributes[attr] = torch.empty(0)
    with graph.inserting_before(layer.depthwise_nodes[0]):
        layer.packed = graph.get_attr(attr)
        if layer.fold is not None:
            weight, bias = fold_batch_norm(static[layer.weight], static.get(layer.bias), layer.fold)
            result.attributes[attr + "_weight"], result.attributes[attr + "_bias"] = weight.contiguous(), bias
            watch_fold(result, layer.weight, layer.fold)
            layer.weight, layer.bias = graph.get_attr(attr + "_weight"), graph.get_attr(attr + "_bias")


def _residual_layer(graph, last: _Layer, shortcut: _Layer, result: RewriteResult, values, pack):
    """get_attr nodes of the last layer's weight with the projection shortcut's appended
    along the input channels, its packed buffer and the summed bias (None if neither has one)."""

    def value(node):
        return None if node is None else values(node)

    weight = value(last.weight)
    shortcut_weight, shortcut_bias = value(shortcut.weight), value(shortcut.bias)
    bias = value(last.bias)
    with torch.no_grad():
        combined = torch.cat([weight.detach(), shortcut_weight.detach().to(weight.dtype)], dim=1)
        if bias is not None or shortcut_bias is not None:
            bias = sum(b.detach() for b in (bias, shortcut_bias) if b is not None)
    attr = f"_sparsecpu_packed_{len(result.attributes)}"
    result.attributes[attr] = pack_weight(combined, pack)
    result.attributes[attr + "_weight"] = combined
    # The sources of a live (unfolded) weight or bias are copied into the constant: a
    # change of them must rebuild (folded ones are watched through their batch norm already).
    sources = [last.weight, last.bias, shortcut.weight, shortcut.bias]
    watched = result.rebuild_if_changed
    watched += [n for n in sources if n is not None and n.op != "get_attr" and n not in watched]
    nodes = [graph.get_attr(attr + "_weight"), graph.get_attr(attr), None]
    if bias is not None:
        result.attributes[attr + "_bias"] = bias
        nodes[2] = graph.get_attr(attr + "_bias")
    return tuple(nodes)


def _drop_unused_attributes(graph: fx.Graph, result: RewriteResult) -> None:
    """Erases get_attr nodes of the rewrite's attributes that nothing reads any more, and
    forgets the attributes no node reads."""
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in result.attributes and not node.users:
            graph.erase_node(node)
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for name in [name for name in result.attributes if name not in read]:
        del result.attributes[name]
