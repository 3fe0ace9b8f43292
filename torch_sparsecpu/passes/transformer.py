"""Open up the fused fast path of ``nn.TransformerEncoderLayer`` so that its linears can
go sparse.

In eval mode with ``batch_first=True`` and no gradients, ``nn.TransformerEncoderLayer``
runs the whole layer as one op, ``torch._transformer_encoder_layer_fwd``: its four
linears (the attention's in_proj and out_proj, linear1 and linear2) are arguments of
that op, never linear calls the matcher could see. :func:`decompose_encoder_layers`
replaces each such call whose linears could go sparse by the same computation in plain
ops, written as the fast path computes it (aten/src/ATen/native/transformers/
transformer.cpp and attention.cpp):

    in_proj      F.linear producing q, k, v; heads split as nn.MultiheadAttention does
    attention    F.scaled_dot_product_attention (what the fast path itself calls when
                 there is no mask); with a mask, softmax(q k^T / sqrt(head_dim)) v over
                 the positions the mask leaves, as its masked softmax does
    out_proj     F.linear, + the layer's input
    feedforward  F.linear -> relu or gelu -> F.linear, + its input
    layer norms  F.layer_norm before (norm_first) or after each block

The linears are then matched, packed and fused (activation, chains) like any others.
A call left as it is gets one decision per linear, with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .match import LayerCall, LayerDecision, skip_reason
from .static import example_value, source_name

ENCODER_LAYER_TARGETS = (torch._transformer_encoder_layer_fwd, torch.ops.aten._transformer_encoder_layer_fwd.default)
FAST_PATH = "nn.TransformerEncoderLayer fast path (_transformer_encoder_layer_fwd)"

_SCHEMA = torch.ops.aten._transformer_encoder_layer_fwd.default._schema
# The op's tensors (but the optional mask), and the arguments the decomposition takes as
# inputs, in its order: those, the mask, and eps (a graph input when Dynamo makes module
# floats dynamic).
_TENSORS = (
    "src",
    "qkv_weight",
    "qkv_bias",
    "proj_weight",
    "proj_bias",
    "norm_weight_1",
    "norm_bias_1",
    "norm_weight_2",
    "norm_bias_2",
    "ffn_weight_1",
    "ffn_bias_1",
    "ffn_weight_2",
    "ffn_bias_2",
)
_INPUTS = _TENSORS + ("mask", "eps")
# Its linears: (weight, bias) arguments.
_LINEARS = (
    ("qkv_weight", "qkv_bias"),
    ("proj_weight", "proj_bias"),
    ("ffn_weight_1", "ffn_bias_1"),
    ("ffn_weight_2", "ffn_bias_2"),
)
# The mask's dims for each mask_type the fast path takes: 0 an attention mask [T, T],
# 1 a key padding mask [B, T], 2 a mask of the scores' shape [B, heads, T, T].
_MASK_DIMS = {0: 2, 1: 2, 2: 4}


def encoder_layer_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``_transformer_encoder_layer_fwd`` call, by their schema names."""
    arguments = {a.name: a.default_value if a.has_default_value() else None for a in _SCHEMA.arguments}
    arguments.update(zip(arguments, node.args, strict=False))
    arguments.update(node.kwargs)
    return arguments


def _linear_calls(node: fx.Node, arguments: dict[str, Any]) -> list[LayerCall]:
    """The call's four linears, as the matcher would see them (their input is the
    layer's: the same dtype and device as every activation inside it)."""
    calls = []
    for weight_name, bias_name in _LINEARS:
        weight = arguments[weight_name]
        value = example_value(weight)
        name = source_name(weight) if isinstance(weight, fx.Node) else weight_name
        calls.append(
            LayerCall(
                node,
                "linear",
                arguments["src"],
                weight,
                arguments[bias_name],
                name,
                tuple(value.shape) if value is not None else (),
            )
        )
    return calls


def _why_not_decomposed(arguments: dict[str, Any]) -> str | None:
    """Why the decomposition would not compute what the fast path does, if it would not."""
    src = example_value(arguments["src"])
    if src is None or src.layout != torch.strided or src.is_nested or src.dim() != 3:
        return f"{FAST_PATH}: input is not a dense [batch, tokens, features] tensor"
    if any(example_value(arguments[name]) is None for name in _TENSORS):
        return f"{FAST_PATH}: a tensor argument has no traced value"
    if not all(isinstance(arguments[name], bool) for name in ("use_gelu", "norm_first")):
        return f"{FAST_PATH}: use_gelu or norm_first is not a constant"
    embed_dim, num_heads = arguments["embed_dim"], arguments["num_heads"]
    qkv_weight = example_value(arguments["qkv_weight"])
    if (
        not isinstance(embed_dim, int)
        or not isinstance(num_heads, int)
        or num_heads <= 0
        or embed_dim % num_heads
        or qkv_weight is None
        or tuple(qkv_weight.shape) != (3 * embed_dim, embed_dim)
    ):
        return f"{FAST_PATH}: embed_dim {embed_dim} and {num_heads} heads do not fit its in_proj weight"
    mask = arguments["mask"]
    if mask is not None:
        mask_value, mask_type = example_value(mask), arguments["mask_type"]
        dims = None if mask_value is None else mask_value.dim()
        if mask_type not in _MASK_DIMS or dims != _MASK_DIMS[mask_type]:
            return f"{FAST_PATH} with a mask of type {mask_type} and {dims} dims stays dense"
    return None


def decompose_encoder_layers(
    graph: fx.Graph, static: dict[fx.Node, torch.Tensor], *, min_sparsity: float, autocast: bool
) -> dict[fx.Node, list[LayerDecision]]:
    """Replaces, in place, each ``_transformer_encoder_layer_fwd`` call of ``graph`` that
    has a linear which would take the sparse path by the layer in plain ops. Returns the
    calls left as they were, each with a decision per linear saying why it stays dense."""
    kept: dict[fx.Node, list[LayerDecision]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ENCODER_LAYER_TARGETS:
            continue
        arguments = encoder_layer_arguments(node)
        calls = _linear_calls(node, arguments)
        skips = [skip_reason(call, static, min_sparsity, autocast) for call in calls]
        why_not = _why_not_decomposed(arguments)
        if why_not is None and any(reason is None for reason, _ in skips):
            _decompose(graph, node, arguments)
            continue
        # A linear that could not go sparse anyway says why; the others, why the layer could not.
        kept[node] = [
            call.decision(sparsity, False, reason or why_not)
            for call, (reason, sparsity) in zip(calls, skips, strict=True)
        ]
    return kept


def _decompose(graph: fx.Graph, node: fx.Node, arguments: dict[str, Any]) -> None:
    """Replaces the fast-path call ``node`` by the layer in plain ops, with the example
    values the matcher reads (propagated with Dynamo's fake tensors)."""
    mask_type = None if arguments["mask"] is None else arguments["mask_type"]
    layer = fx.symbolic_trace(
        _encoder_layer(
            arguments["embed_dim"], arguments["num_heads"], arguments["use_gelu"], arguments["norm_first"], mask_type
        )
    )
    inputs = [arguments[name] for name in _INPUTS]
    values = [a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a for a in inputs]
    # Dynamo's example values, in Dynamo's own fake mode (the backend's tracing context
    # holds another one).
    fake_mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
    if fake_mode is not None:
        FakeTensorProp(layer, fake_mode).propagate_dont_convert_inputs(*values)
    else:
        FakeTensorProp(layer).propagate(*values)
    placeholders = [n for n in layer.graph.nodes if n.op == "placeholder"]
    value_map: dict[fx.Node, Any] = dict(zip(placeholders, inputs, strict=True))
    for new in layer.graph.nodes:
        if new.op not in ("placeholder", "output"):
            new.meta = {
                "example_value": new.meta["val"],
                **{k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta},
            }
    with graph.inserting_before(node):
        output = graph.graph_copy(layer.graph, value_map)
    node.replace_all_uses_with(output)
    graph.erase_node(node)


def _encoder_layer(embed_dim: int, num_heads: int, use_gelu: bool, norm_first: bool, mask_type: int | None):
    """The computation of ``_transformer_encoder_layer_fwd`` for these settings, as a
    function of its inputs (``_INPUTS``) that symbolic_trace turns into a graph."""
    head_dim = embed_dim // num_heads

    def heads(t):  # [B, T, D] -> [B, heads, T, head_dim]
        return t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

    def attention(q, k, v, mask):
        if mask_type is None:
            return F.scaled_dot_product_attention(q, k, v)
        # The fast path reads the mask as bool (nonzero masks a position out), and its
        # masked softmax leaves NaN in a row masked out entirely, as this does.
        masked = mask.to(torch.bool)
        if mask_type == 1:  # key padding [B, T]
            masked = masked[:, None, None, :]
        scores = torch.matmul(q / math.sqrt(head_dim), k.transpose(-2, -1))
        return torch.matmul(torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1), v)

    def layer(
        src,
        qkv_weight,
        qkv_bias,
        proj_weight,
        proj_bias,
        norm_weight_1,
        norm_bias_1,
        norm_weight_2,
        norm_bias_2,
        ffn_weight_1,
        ffn_bias_1,
        ffn_weight_2,
        ffn_bias_2,
        mask,
        eps,
    ):
        x = F.layer_norm(src, (embed_dim,), norm_weight_1, norm_bias_1, eps) if norm_first else src
        qkv = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
        context = attention(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]), mask)
        x = F.linear(context.transpose(1, 2).flatten(2), proj_weight, proj_bias) + src
        if not norm_first:
            x = F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)
        residual = x
        if norm_first:
            x = F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        x = F.linear(hidden, ffn_weight_2, ffn_bias_2) + residual
        if not norm_first:
            x = F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)
        return x

    return layer
