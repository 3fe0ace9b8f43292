"""Fuse runs of sparse convolutions that feed each other into one ``sparsecpu::conv_chain``
call (inference graphs only: the chain op has no autograd formula).

A chain is ``conv -> conv (-> conv ...)`` where each ``sparsecpu::conv2d`` (its batch norm
and activation already folded in by rewrite.py) is the only user of the one before, and
the first is a 1 x 1 convolution without padding: a ResNet bottleneck's
``1x1 -> 3x3 -> 1x1``. When the last one (1 x 1, no activation) feeds a residual add of the
chain's input (identity shortcut) or of a 1 x 1 sparse convolution of it (projection
shortcut, at the chain's stride), the add and the activation after it join the chain:
the last layer then also reads the chain's input, through the concatenated weight
``[W_last | W_shortcut]`` (``W_shortcut`` the identity for an identity shortcut), with the
sum of both biases and the final activation (see csrc/ops/conv_chain.cpp).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from .. import ops
from .match import fusable_activation
from .rewrite import RewriteResult, pack_weight
from .static import example_value

log = logging.getLogger(__name__)

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_", "__iadd__")


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


def _chains(graph: fx.Graph, values) -> list[tuple[list[_Layer], _Residual | None]]:
    """Maximal runs of sparse convolutions, each the only user of the one before and the
    first 1 x 1 without padding, with the residual add after them if any. (Graph order is
    topological: a run's first 1 x 1 layer is met before the others.)"""
    found = []
    taken: set[fx.Node] = set()
    for node in graph.nodes:
        layer = _layer(node, values)
        if layer is None or node in taken or not layer.is_pointwise():
            continue
        chain = [layer]
        while (nxt := _layer(_only_user(chain[-1].node), values)) is not None and nxt.x is chain[-1].node:
            chain.append(nxt)
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

    lengths = []
    for chain, residual in _chains(graph, values):
        weights = [layer.weight for layer in chain]
        packed = [layer.packed for layer in chain]
        biases = [layer.bias for layer in chain]
        activations = [layer.activation for layer in chain]
        replaced = chain[-1].node
        if residual is not None:
            replaced = residual.activation_node or residual.add
            with graph.inserting_before(replaced):
                weights[-1], packed[-1], biases[-1] = _residual_layer(graph, chain[-1], residual, result, values, pack)
            activations[-1] = residual.activation
        strides = [v for layer in chain for v in layer.stride]
        paddings = [v for layer in chain for v in layer.padding]
        with graph.inserting_before(replaced):
            fused = graph.call_function(
                torch.ops.sparsecpu.conv_chain.default,
                # The input as it is now: an earlier chain may have replaced the node it was.
                (chain[0].node.args[0], weights, packed, biases, strides, paddings, activations, residual is not None),
            )
        fused.meta = dict(replaced.meta)
        replaced.replace_all_uses_with(fused)
        erased = [layer.node for layer in reversed(chain)]
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


def _residual_layer(graph, last: _Layer, residual: _Residual, result: RewriteResult, values, pack):
    """get_attr nodes of the last layer's weight with the shortcut's appended along the
    input channels, its packed buffer and the summed bias (None if neither has one)."""

    def value(node):
        return None if node is None else values(node)

    weight = value(last.weight)
    if residual.shortcut is None:
        shortcut_weight, shortcut_bias = torch.eye(weight.size(0)).view(weight.size(0), -1, 1, 1), None
    else:
        shortcut_weight, shortcut_bias = value(residual.shortcut.weight), value(residual.shortcut.bias)
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
    sources = [last.weight, last.bias]
    if residual.shortcut is not None:
        sources += [residual.shortcut.weight, residual.shortcut.bias]
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
