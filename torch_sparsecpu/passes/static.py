"""What the passes know of a graph's values: which nodes are static tensors (parameters,
buffers, constants), the name a layer's weight has in the model, and traced example values."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.fx as fx


def fetch_attr(root: torch.nn.Module, target: str):
    """The attribute ``target`` ('encoder.layer.0.weight') of ``root``, as get_attr reads it."""
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def find_static_tensors(gm: fx.GraphModule, example_inputs: Sequence) -> dict[fx.Node, torch.Tensor]:
    """Graph nodes whose value is fixed across calls: parameters and buffers that Dynamo
    lifted to placeholders (their example inputs are the real tensors), and get_attr constants."""
    static: dict[fx.Node, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs, strict=False):
        if not isinstance(value, torch.Tensor):
            continue
        marked = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
        if isinstance(value, torch.nn.Parameter) or marked:
            static[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                static[node] = value
    return static


def source_name(node: fx.Node) -> str:
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


def example_value(node) -> torch.Tensor | None:
    """The tensor a node held while Dynamo traced (meta ``example_value`` or ``val``), if any."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None
