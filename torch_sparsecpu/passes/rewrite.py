"""Rewrite the linear and conv2d calls that qualify (see match.py), with the batch norm
and activation that follow, into ``sparsecpu::linear`` / ``sparsecpu::conv2d`` calls that
read their packed weights with get_attr. Everything else is left exactly as it was."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.fx as fx

from .. import ops
from .batch_norm import BatchNormFold, batch_norm_after, fold_batch_norm
from .match import (
    LayerCall,
    LayerDecision,
    conv_geometry,
    fusable_activation,
    match_layer,
    skip_reason,
    under_autocast,
)
from .packed_cache import packed_once
from .transformer import decompose_encoder_layers


@dataclasses.dataclass
class RewriteResult:
    """What :func:`rewrite_sparse_layers` did to a graph, and what the backend has to
    keep and watch for it."""

    # The tensors the rewritten graph reads with get_attr, by attribute name: packed
    # weights (_sparsecpu_packed_<n>), and folded weights and biases (<that>_weight, _bias).
    attributes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Each packed weight's (node, weight_transposed) -> its packed attribute (a weight used
    # by several calls is packed once; as [in, out], GPT-2's Conv1D, it is packed transposed).
    packed_attr_of: dict[tuple[fx.Node, bool], str] = dataclasses.field(default_factory=dict)
    # Nodes whose change needs a rebuild: a convolution's weight and bias and its folded
    # batch norm's weight and bias (the op runs a folded copy, so its own check that a
    # packed buffer matches its weight cannot see them change).
    rebuild_if_changed: list[fx.Node] = dataclasses.field(default_factory=list)
    # The running statistics of folded batch norms, to compare by value: a training-mode
    # batch norm updates them in place without bumping their version.
    compared_by_value: list[fx.Node] = dataclasses.field(default_factory=list)
    # One per linear or conv2d call of the graph, in graph order (four for a fused
    # nn.TransformerEncoderLayer call left as it was: its linears).
    decisions: list[LayerDecision] = dataclasses.field(default_factory=list)


def pack_weight(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor] = ops.pack_linear):
    """The packed buffer of a linear weight, or of a convolution's as [out, in x kernel]."""
    return pack(weight.detach().flatten(1))


def rewrite_sparse_layers(
    graph: fx.Graph,
    static: dict[fx.Node, torch.Tensor],
    *,
    min_sparsity: float,
    fuse_activations: bool,
    fold_batch_norms: bool = False,
    pack: Callable[[torch.Tensor], torch.Tensor] = ops.pack_linear,
) -> RewriteResult:
    """Rewrites ``graph`` in place: each linear or conv2d call whose weight is a static
    tensor of ``static`` at least ``min_sparsity`` zeros becomes a sparse op, with the
    activation after it when ``fuse_activations``. ``fold_batch_norms`` (only for graphs
    that need no gradients) folds an eval-mode batch norm that follows a sparse
    convolution into its weight and bias. A weight used by several calls is packed once.
    ``nn.TransformerEncoderLayer``'s fused fast path is first opened up into plain ops
    where its linears could go sparse (transformer.py)."""
    result = RewriteResult()
    autocast = under_autocast(graph)
    fast_paths_kept = decompose_encoder_layers(graph, static, min_sparsity=min_sparsity, autocast=autocast)
    for node in list(graph.nodes):
        if node in fast_paths_kept:
            result.decisions += fast_paths_kept[node]
            continue
        call = match_layer(node, static)
        if call is None:
            continue
        reason, sparsity = skip_reason(call, static, min_sparsity, autocast)
        geometry = None
        if reason is None and call.kind == "conv2d":
            geometry, reason = conv_geometry(node, call.weight_shape)
        if reason is not None:
            result.decisions.append(call.decision(sparsity, False, reason))
            continue
        fold = None
        if call.kind == "conv2d" and fold_batch_norms:
            fold = batch_norm_after(node, call.bias, static)
        output = node if fold is None else fold.node
        act_node, activation = fusable_activation(output) if fuse_activations else (None, "none")
        attr = _packed_attribute(result, static, call, fold, pack)
        _emit(graph, call, attr, fold, act_node, activation, geometry)
        result.decisions.append(
            call.decision(
                sparsity,
                True,
                activation=activation,
                block_rows=ops.packed_info(result.attributes[attr]).block_rows,
                batch_norm_folded=fold is not None,
            )
        )
    graph.lint()
    return result


def _packed_attribute(
    result: RewriteResult,
    static: dict[fx.Node, torch.Tensor],
    call: LayerCall,
    fold: BatchNormFold | None,
    pack: Callable[[torch.Tensor], torch.Tensor],
) -> str:
    """The attribute of ``call``'s packed weight: the one packed before for the same
    weight, or a new one (always for a folded batch norm, whose weight is the layer's own)
    holding the weight's buffer of an earlier build if it has not changed since."""
    key = (call.weight, call.weight_transposed)
    if fold is None and key in result.packed_attr_of:
        return result.packed_attr_of[key]
    attr = f"_sparsecpu_packed_{len(result.attributes)}"
    if fold is None:
        result.attributes[attr] = packed_once(static[call.weight], pack, weight_transposed=call.weight_transposed)
        result.packed_attr_of[key] = attr
    else:
        weight, bias = fold_batch_norm(static[call.weight], static.get(call.bias), fold)
        result.attributes[attr] = pack_weight(weight, pack)
        result.attributes[attr + "_weight"], result.attributes[attr + "_bias"] = weight, bias
        result.rebuild_if_changed += [call.weight, *fold.parameters]
        result.compared_by_value += fold.running_stats
    return attr


def _emit(
    graph: fx.Graph,
    call: LayerCall,
    attr: str,
    fold: BatchNormFold | None,
    act_node: fx.Node | None,
    activation: str,
    geometry: tuple | None,
) -> None:
    """Replaces ``call`` (+ its folded batch norm, + its fused activation) by one sparse op."""
    replaced = act_node or (call.node if fold is None else fold.node)
    weight, bias = call.weight, call.bias
    with graph.inserting_before(call.node):
        packed = graph.get_attr(attr)
        if fold is not None:
            weight, bias = graph.get_attr(attr + "_weight"), graph.get_attr(attr + "_bias")
        if call.kind == "linear":
            args = (call.x, weight, packed, bias, activation)
            # A transposed weight is passed as it is, never as a view: a view made in the
            # graph reaches the op without the weight's version counter (Inductor
            # reinterprets the storage), and the op could not see the weight edited.
            kwargs = {"weight_transposed": True} if call.weight_transposed else {}
            sparse = graph.call_function(torch.ops.sparsecpu.linear.default, args, kwargs)
        else:
            args = (call.x, weight, packed, bias, *geometry, activation)
            sparse = graph.call_function(torch.ops.sparsecpu.conv2d.default, args)
    sparse.meta = dict(replaced.meta)
    replaced.replace_all_uses_with(sparse)
    for node in (act_node, None if fold is None else fold.node, call.node):
        if node is not None:
            graph.erase_node(node)
