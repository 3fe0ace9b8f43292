"""Rewrite the linear and conv2d calls that qualify (see match.py), with the batch norm
and activation that follow, into ``sparsecpu::linear`` / ``sparsecpu::conv2d`` calls that
read their packed weights with get_attr. A weight the graph computes from static tensors
(a pruning mask applied by torch.nn.utils.prune or parametrize, see computed.py) becomes
a constant first, in inference graphs. Everything else is left exactly as it was."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
import torch.fx as fx

from .. import ops
from .batch_norm import BatchNormFold, batch_norm_after, fold_batch_norm
from .computed import ComputedWeight, computed_weight
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
from .static import example_value
from .transformer import decompose_encoder_layers


@dataclasses.dataclass
class RewriteResult:
    """What :func:`rewrite_sparse_layers` did to a graph, and what the backend has to
    keep and watch for it."""

    # The tensors the rewritten graph reads with get_attr, by attribute name: packed
    # weights (_sparsecpu_packed_<n>), and folded weights and biases (<that>_weight, _bias).
    attributes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Each packed weight's (node, weight_transposed, quantize) -> its packed attribute (a
    # weight used by several calls is packed once per datatype; as [in, out], GPT-2's
    # Conv1D, it is packed transposed).
    packed_attr_of: dict[tuple[fx.Node, bool, str | None], str] = dataclasses.field(default_factory=dict)
    # Nodes whose change needs a rebuild: a convolution's weight and bias and its folded
    # batch norm's weight and bias (the op runs a folded copy, so its own check that a
    # packed buffer matches its weight cannot see them change); a computed weight's
    # sources and its constant (which Dynamo may hand out as the pruned module's weight).
    rebuild_if_changed: list[fx.Node] = dataclasses.field(default_factory=list)
    # The running statistics of folded batch norms, to compare by value: a training-mode
    # batch norm updates them in place without bumping their version.
    compared_by_value: list[fx.Node] = dataclasses.field(default_factory=list)
    # One per linear or conv2d call of the graph, in graph order (four for a fused
    # nn.TransformerEncoderLayer call left as it was: its linears).
    decisions: list[LayerDecision] = dataclasses.field(default_factory=list)
    # The constants that replaced computed weights (get_attr nodes) -> what they were
    # computed from (its steps are erased from the graph where nothing else read them).
    computed_weights: dict[fx.Node, ComputedWeight] = dataclasses.field(default_factory=dict)


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
    fold_computed_weights: bool = False,
    pack: Callable[[torch.Tensor], torch.Tensor] = ops.pack_linear,
    quantize: str | None = None,
) -> RewriteResult:
    """Rewrites ``graph`` in place: each linear or conv2d call whose weight is a static
    tensor of ``static`` at least ``min_sparsity`` zeros becomes a sparse op, with the
    activation after it when ``fuse_activations``. ``fold_batch_norms`` (only for graphs
    that need no gradients) folds an eval-mode batch norm that follows a sparse
    convolution into its weight and bias. ``fold_computed_weights`` (likewise) evaluates
    a weight computed from static tensors alone once and, if the layer qualifies with it,
    reads it as a constant instead (added to ``static``). A weight used by several calls
    is packed once. ``quantize`` ("int8") packs a linear's weight so where
    ``ops.int8_pays`` for it and the call's token count (known when the graph's shapes
    are static); convolutions and the other linears stay fp32.
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
        computed = result.computed_weights.get(call.weight) or computed_weight(call.weight, static)
        origin = "" if computed is None else computed.origin
        if computed is not None:
            call = dataclasses.replace(call, name=computed.name)
        weights = _with_computed_value(static, call.weight, computed) if fold_computed_weights else static
        reason, sparsity = skip_reason(call, weights, min_sparsity, autocast)
        geometry = None
        if reason is None and call.kind == "conv2d":
            geometry, reason = conv_geometry(node, call.weight_shape)
        if reason is not None:
            if computed is not None and not fold_computed_weights:
                reason = "weight is computed on every call; only graphs compiled with grad mode off fold it"
            result.decisions.append(call.decision(sparsity, False, reason, weight_origin=origin))
            continue
        if call.weight not in static:
            call = _fold_computed_weight(graph, call, computed, weights[call.weight], static, result)
        fold = None
        if call.kind == "conv2d" and fold_batch_norms:
            fold = batch_norm_after(node, call.bias, static)
        output = node if fold is None else fold.node
        act_node, activation = fusable_activation(output) if fuse_activations else (None, "none")
        datatype = _datatype_for(call, static[call.weight], quantize)
        attr = _packed_attribute(result, static, call, fold, pack, datatype)
        _emit(graph, call, attr, fold, act_node, activation, geometry)
        info = ops.packed_info(result.attributes[attr])
        result.decisions.append(
            call.decision(
                sparsity,
                True,
                activation=activation,
                block_rows=info.block_rows,
                batch_norm_folded=fold is not None,
                weight_origin=origin,
                datatype=info.datatype,
            )
        )
    graph.lint()
    return result


def _with_computed_value(static: dict[fx.Node, torch.Tensor], weight, computed: ComputedWeight | None) -> Mapping:
    """``static`` with the value of ``weight`` added if it is computed (unless an earlier
    call of the same weight made it a constant already, or it evaluates to no tensor)."""
    value = None if computed is None or weight in static else computed.evaluate(static)
    return static if value is None else collections.ChainMap({weight: value}, static)


def _fold_computed_weight(
    graph: fx.Graph,
    call: LayerCall,
    computed: ComputedWeight,
    value: torch.Tensor,
    static: dict[fx.Node, torch.Tensor],
    result: RewriteResult,
) -> LayerCall:
    """``call`` with its computed weight replaced by a constant holding ``value``: every
    reader of the weight reads the constant (also Dynamo's output that sets a pruned
    module's ``weight`` attribute, so the mask is not applied again on every call), and
    the steps nothing else reads are erased. The constant and the sources are watched."""
    attr = f"_sparsecpu_computed_{len(result.attributes)}"
    result.attributes[attr] = value
    with graph.inserting_before(computed.node):
        constant = graph.get_attr(attr)
    constant.meta["example_value"] = example_value(computed.node)
    computed.node.replace_all_uses_with(constant)
    for step in reversed(computed.steps):
        if not step.users:
            graph.erase_node(step)
    static[constant] = value
    result.computed_weights[constant] = computed
    result.rebuild_if_changed += [constant, *computed.sources]
    return dataclasses.replace(call, weight=constant)


def _datatype_for(call: LayerCall, weight: torch.Tensor, quantize: str | None) -> str | None:
    """What a layer is packed as under the backend's ``quantize``: ``quantize`` for a linear
    whose weight (``[out, in]``) ``ops.int8_pays`` for at the call's token count (its
    input's static sizes but the last; unknown when one is symbolic), else None (fp32)."""
    if quantize is None or call.kind != "linear":
        return None
    value = example_value(call.x) if isinstance(call.x, fx.Node) else None
    sizes = tuple(value.shape[:-1]) if value is not None and value.dim() >= 1 else None
    tokens = math.prod(sizes) if sizes is not None and all(isinstance(s, int) for s in sizes) else None
    return quantize if ops.int8_pays(weight.t() if call.weight_transposed else weight, tokens) else None


def _packed_attribute(
    result: RewriteResult,
    static: dict[fx.Node, torch.Tensor],
    call: LayerCall,
    fold: BatchNormFold | None,
    pack: Callable[..., torch.Tensor],
    quantize: str | None,
) -> str:
    """The attribute of ``call``'s packed weight (packed with ``quantize``, None for fp32):
    the one packed the same way before for the same weight, or a new one (always for a
    folded batch norm, whose weight is the layer's own) holding the weight's buffer of an
    earlier build if it has not changed since."""
    key = (call.weight, call.weight_transposed, quantize)
    if fold is None and key in result.packed_attr_of:
        return result.packed_attr_of[key]
    attr = f"_sparsecpu_packed_{len(result.attributes)}"
    if fold is None:
        result.attributes[attr] = packed_once(
            static[call.weight], pack, weight_transposed=call.weight_transposed, quantize=quantize
        )
        result.packed_attr_of[key] = attr
    else:
        weight, bias = fold_batch_norm(static[call.weight], static.get(call.bias), fold)
        result.attributes[attr] = pack_weight(weight, pack)  # (convolutions: never quantized)
        result.attributes[attr + "_weight"], result.attributes[attr + "_bias"] = weight, bias
        watch_fold(result, call.weight, fold)
    return attr


def watch_fold(result: RewriteResult, weight: fx.Node, fold: BatchNormFold) -> None:
    """Watches what a convolution's weight folded with its batch norm was made from: the
    weight and the batch norm's parameters (a change rebuilds), its running statistics
    (compared by value: a training-mode batch norm updates them without a version bump)."""
    result.rebuild_if_changed += [n for n in (weight, *fold.parameters) if n not in result.rebuild_if_changed]
    result.compared_by_value += fold.running_stats


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
