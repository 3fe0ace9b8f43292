"""Rewrite ``linear`` and ``conv2d`` calls (+ the activation that follows) into
``sparsecpu::linear`` / ``sparsecpu::conv2d``, and fuse chains of sparse linears.

A layer is taken when its weight is a static float32 CPU parameter (a graph input
that Dynamo marks as a parameter or buffer, or a ``get_attr`` constant) whose
fraction of exact zeros is at least ``min_sparsity``, and its input is float32.
Convolutions must also be ungrouped (zero padding; any kernel, stride and dilation).
Everything else is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ops

log = logging.getLogger("torch_sparsecpu")

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
CONV2D_TARGETS = (torch.conv2d, F.conv2d)


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

    def __str__(self) -> str:
        sparsity = "   -  " if self.sparsity is None else f"{self.sparsity:6.1%}"
        blocks = f"{self.block_rows}x1 blocks, " if self.block_rows > 1 else ""
        blocks += "batch norm folded, " if self.batch_norm_folded else ""
        what = f"sparse, {blocks}activation {self.activation}" if self.taken else f"dense: {self.reason}"
        return f"{self.name:<48} {self.kind:<6} [{self.out_features:>5} x {self.in_features:>5}] {sparsity}  {what}"


def _fetch_attr(root: torch.nn.Module, target: str):
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def find_static_tensors(gm: fx.GraphModule, example_inputs: Sequence) -> dict[fx.Node, torch.Tensor]:
    """Graph nodes whose value is fixed across calls: parameters and buffers that Dynamo
    lifted to placeholders (their example inputs are the real tensors), and get_attr constants."""
    static: dict[fx.Node, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            continue
        marked = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
        if isinstance(value, torch.nn.Parameter) or marked:
            static[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                static[node] = value
    return static


def _activation_of(node: fx.Node) -> str | None:
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
    if target is F.hardtanh:  # nn.ReLU6 is hardtanh(x, 0, 6)
        bounds = [node.kwargs.get(name, node.args[i] if len(node.args) > i else default)
                  for i, name, default in ((1, "min_val", -1.0), (2, "max_val", 1.0))]
        return "relu6" if bounds == [0, 6] else None
    if target in (F.gelu, torch._C._nn.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _source_name(node: fx.Node) -> str:
    """'encoder.layer.0.output.dense.weight' from Dynamo's source, else the node name."""
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        return node.target if node.op == "get_attr" else node.name
    text = source.name if isinstance(source.name, str) else source.name()
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)", text)
    if parts:
        return ".".join(a or b for a, b in parts)
    local = re.fullmatch(r"L\['([^']+)'\]", text)  # a graph input of the compiled function
    return local.group(1) if local else text


def _example_value(node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _under_autocast(graph: fx.Graph) -> bool:
    """Autocast entered inside the graph, or around it (Dynamo guards on that state,
    so a change of it recompiles)."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return any(
        n.op == "call_function" and "autocast" in getattr(n.target, "__name__", "") for n in graph.nodes
    )


def _linear_args(node: fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _conv_args(node: fx.Node):
    """input, weight, bias, stride, padding, dilation, groups of a conv2d call."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    args = list(node.args) + list(defaults[len(node.args):])
    return [node.kwargs.get(name, arg) for name, arg in zip(names, args)]


def _pair(value) -> tuple | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        return tuple(value) * (3 - len(value))
    return None


def _conv_geometry(node: fx.Node, weight_shape: tuple) -> tuple[tuple | None, str | None]:
    """(stride, padding, dilation) pairs of a conv2d call the sparse op can run, or
    why it cannot."""
    _, _, _, stride, padding, dilation, groups = _conv_args(node)
    if groups != 1:
        return None, f"groups={groups}: only ungrouped convolutions take the sparse path"
    stride, dilation = _pair(stride), _pair(dilation)
    if stride is None or dilation is None:
        return None, "stride or dilation not given as ints"
    kernel = weight_shape[2:]
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride 1; an even extent pads unevenly, which the op does not do
        if any(dilation[i] * (kernel[i] - 1) % 2 for i in range(2)):
            return None, "padding='same' with an even kernel extent pads unevenly"
        padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(2))
    elif _pair(padding) is None:
        return None, f"padding={padding!r} not given as ints"
    else:
        padding = _pair(padding)
    return (stride, padding, dilation), None


def _skip_reason(x, weight_node, bias, static, min_sparsity, autocast,
                 kind: str = "linear") -> tuple[str | None, float | None]:
    weight = static.get(weight_node) if isinstance(weight_node, fx.Node) else None
    if weight is None:
        return "weight is not a static parameter", None
    if weight.dtype != torch.float32:
        return f"weight dtype is {weight.dtype}, only float32 takes the sparse path", None
    dims = 2 if kind == "linear" else 4
    if weight.device.type != "cpu" or weight.dim() != dims or weight.is_sparse:
        return f"weight is not a dense {dims}-D CPU tensor", None
    x_value = _example_value(x)
    if x_value is None or x_value.dtype != torch.float32 or x_value.device.type != "cpu":
        dtype = None if x_value is None else x_value.dtype
        return f"input dtype is {dtype}, only float32 CPU inputs take the sparse path", None
    if kind == "conv2d" and x_value.dim() != 4:
        return f"input has {x_value.dim()} dims: only batched [N, C, H, W] inputs take the sparse path", None
    if autocast:
        return "the graph runs under autocast", None
    if bias is not None:
        bias_value = _example_value(bias) if isinstance(bias, fx.Node) else None
        if bias_value is None or bias_value.dtype != torch.float32 or bias_value.dim() != 1:
            return "bias is not a 1-D float32 tensor", None
    with torch.no_grad():
        sparsity = 1.0 - torch.count_nonzero(weight).item() / max(weight.numel(), 1)
    if sparsity < min_sparsity:
        return f"sparsity {sparsity:.1%} is below min_sparsity {min_sparsity:.1%}", sparsity
    return None, sparsity


@dataclasses.dataclass
class _BatchNormFold:
    """An eval-mode batch norm that reads only a convolution's output, and the static
    tensors it and the convolution's bias come from."""

    node: fx.Node
    running_stats: list[fx.Node]  # running mean and var
    parameters: list[fx.Node]  # the batch norm's weight and bias and the conv's bias, those given
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float


def _batch_norm_after(conv: fx.Node, bias, static: dict[fx.Node, torch.Tensor]) -> _BatchNormFold | None:
    users = list(conv.users)
    bn = users[0] if len(users) == 1 else None
    if bn is None or bn.op != "call_function" or bn.target is not F.batch_norm or bn.args[:1] != (conv,):
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = (None, None, None, None, None, False, 0.1, 1e-5)
    args = list(bn.args) + list(defaults[len(bn.args):])
    _, mean, var, gamma, beta, training, _, eps = [bn.kwargs.get(n, a) for n, a in zip(names, args)]
    tensors = [t for t in (mean, var, gamma, beta, bias) if t is not None]
    if training is not False or mean is None or var is None or not isinstance(eps, float):
        return None
    if not all(isinstance(t, fx.Node) and t in static and static[t].dtype == torch.float32 for t in tensors):
        return None
    value = {t: static[t] for t in tensors}
    parameters = [t for t in (gamma, beta, bias) if t is not None]
    return _BatchNormFold(bn, [mean, var], parameters, value[mean], value[var], value.get(gamma), value.get(beta), eps)


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, fold: _BatchNormFold):
    """The weight and bias of conv -> batch norm as one convolution (same zeros)."""
    with torch.no_grad():
        scale = torch.rsqrt(fold.var + fold.eps)
        if fold.gamma is not None:
            scale = scale * fold.gamma
        folded_bias = -fold.mean * scale if bias is None else (bias - fold.mean) * scale
        if fold.beta is not None:
            folded_bias = folded_bias + fold.beta
        return weight * scale.view(-1, 1, 1, 1), folded_bias


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
) -> tuple[dict[str, torch.Tensor], dict[fx.Node, str], list[fx.Node], list[fx.Node], list[LayerDecision]]:
    """Rewrites ``graph`` in place. Returns the tensors the new graph reads with
    get_attr by attribute name (packed weights; folded weights and biases), the
    attribute name of each packed weight node (repacked in place when that weight
    changes), the nodes whose change needs a rebuild instead (a convolution's weight
    and bias and its folded batch norm's weight and bias), the running statistics of
    folded batch norms (whose values must be compared: a training-mode batch norm
    updates them in place without bumping their version), and one decision per linear
    or conv2d call.

    ``fold_batch_norms`` (only for graphs that need no gradients) folds an eval-mode
    batch norm that follows a sparse convolution into its weight and bias."""
    packed_attrs: dict[str, torch.Tensor] = {}
    decisions: list[LayerDecision] = []
    autocast = _under_autocast(graph)
    packed_by_weight: dict[fx.Node, str] = {}
    rebuild_if_changed: list[fx.Node] = []
    compared_by_value: list[fx.Node] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS + CONV2D_TARGETS:
            continue
        kind = "linear" if node.target in LINEAR_TARGETS else "conv2d"
        x, weight_node, bias = _linear_args(node) if kind == "linear" else _conv_args(node)[:3]
        name = _source_name(weight_node) if isinstance(weight_node, fx.Node) else str(weight_node)
        w_value = _example_value(weight_node) if isinstance(weight_node, fx.Node) else None
        w_shape = tuple(w_value.shape) if w_value is not None else ()
        shape = w_shape[:2] if len(w_shape) == (2 if kind == "linear" else 4) else (0, 0)
        reason, sparsity = _skip_reason(x, weight_node, bias, static, min_sparsity, autocast, kind)
        geometry = None
        if reason is None and kind == "conv2d":
            geometry, reason = _conv_geometry(node, w_shape)
        if reason is not None:
            decisions.append(LayerDecision(name, *shape, sparsity, False, reason, kind=kind))
            log.debug("%s %s %s: dense (%s)", kind, name, list(shape), reason)
            continue

        fold = _batch_norm_after(node, bias, static) if kind == "conv2d" and fold_batch_norms else None
        output = node if fold is None else fold.node
        users = list(output.users)
        act_node = None
        activation = "none"
        if fuse_activations and len(users) == 1 and users[0].args and users[0].args[0] is output:
            activation = _activation_of(users[0]) or "none"
            act_node = users[0] if activation != "none" else None

        if fold is not None:
            weight, folded_bias = fold_batch_norm(static[weight_node], static.get(bias), fold)
            attr = f"_sparsecpu_packed_{len(packed_attrs)}"
            packed_attrs[attr] = pack_weight(weight, pack)
            packed_attrs[attr + "_weight"], packed_attrs[attr + "_bias"] = weight, folded_bias
            rebuild_if_changed += [weight_node, *fold.parameters]
            compared_by_value += fold.running_stats
        elif weight_node not in packed_by_weight:
            attr = f"_sparsecpu_packed_{len(packed_attrs)}"
            packed_attrs[attr] = pack_weight(static[weight_node], pack)
            packed_by_weight[weight_node] = attr
        else:
            attr = packed_by_weight[weight_node]
        replaced = act_node or output
        with graph.inserting_before(node):
            packed_node = graph.get_attr(attr)
            if fold is not None:
                weight_node, bias = graph.get_attr(attr + "_weight"), graph.get_attr(attr + "_bias")
            if kind == "linear":
                sparse = graph.call_function(
                    torch.ops.sparsecpu.linear.default, (x, weight_node, packed_node, bias, activation)
                )
            else:
                sparse = graph.call_function(
                    torch.ops.sparsecpu.conv2d.default, (x, weight_node, packed_node, bias, *geometry, activation)
                )
        sparse.meta = dict(replaced.meta)
        replaced.replace_all_uses_with(sparse)
        if act_node is not None:
            graph.erase_node(act_node)
        if fold is not None:
            graph.erase_node(fold.node)
        graph.erase_node(node)
        block_rows = int(packed_attrs[attr][9])  # header: kBlockRows
        decisions.append(LayerDecision(name, *shape, sparsity, True, "", activation, block_rows, kind,
                                       batch_norm_folded=fold is not None))
        log.debug("%s %s %s: sparse (sparsity %.1f%%, %dx1 blocks, activation %s%s)", kind, name, list(shape),
                  100 * sparsity, block_rows, activation, ", batch norm folded" if fold else "")
    graph.lint()
    return packed_attrs, packed_by_weight, rebuild_if_changed, compared_by_value, decisions


def fuse_sparse_chains(graph: fx.Graph) -> list[int]:
    """Merges runs of ``sparsecpu::linear`` calls where each feeds only the next into one
    ``sparsecpu::linear_chain`` call (tensor columns). Returns the length of each chain.
    Only for inference graphs: the chain op has no autograd formula."""
    linear = torch.ops.sparsecpu.linear.default
    chains = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not linear:
            continue
        if any(node in chain for chain in chains):
            continue
        chain = [node]
        while True:
            users = list(chain[-1].users)
            nxt = users[0] if len(users) == 1 else None
            if nxt is None or nxt.target is not linear or nxt.args[0] is not chain[-1]:
                break
            chain.append(nxt)
        if len(chain) > 1:
            chains.append(chain)
    for chain in chains:
        args = [n.args + (None, "none")[len(n.args) - 3:] for n in chain]
        with graph.inserting_before(chain[-1]):
            fused = graph.call_function(torch.ops.sparsecpu.linear_chain.default, (
                chain[0].args[0], [a[1] for a in args], [a[2] for a in args],
                [a[3] for a in args], [a[4] for a in args]))
        fused.meta = dict(chain[-1].meta)
        chain[-1].replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
    graph.lint()
    return [len(chain) for chain in chains]


__all__ = [
    "LayerDecision", "find_static_tensors", "fold_batch_norm", "fuse_sparse_chains", "pack_weight", "rewrite_sparse_layers",
]
