"""Weights the graph computes from static tensors alone, as pruning libraries leave them:

    torch.nn.utils.prune        a forward pre-hook sets ``weight = weight_mask * weight_orig``
                                (until ``prune.remove``)
    torch.nn.utils.parametrize  ``weight`` is a parametrization of ``parametrizations.weight.original``,
                                e.g. ``original * mask``

Such a weight is the same on every call until one of its sources (a parameter or buffer)
changes. An inference graph can therefore evaluate it once at compile time and read it as
a constant, which the sparse ops pack like any weight; the backend watches the sources
and rebuilds when one changes. Graphs that need gradients keep computing it (gradients
flow to its sources through the computation)."""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx

from .static import example_value, source_name

# Python operators whose ATen op has another name (the rest share it: mul, add, neg, ...).
_ATEN_NAME_OF_OPERATOR = {operator.truediv: "div", operator.floordiv: "floor_divide"}
# Tensor methods that are a dtype conversion (ATen's ``to``).
_CONVERSION_METHODS = {"float", "double", "half", "bfloat16", "bool", "type_as"}
_PRUNE = "pruned via torch.nn.utils.prune"
_PARAMETRIZE = "parametrized via torch.nn.utils.parametrize"


@dataclasses.dataclass(frozen=True)
class ComputedWeight:
    """A weight the graph computes, on every call, from static tensors only."""

    node: fx.Node  # the node whose value is the weight
    sources: tuple[fx.Node, ...]  # the static tensors it is computed from
    steps: tuple[fx.Node, ...]  # the nodes that compute it, in graph order (``node`` last)
    name: str  # the weight's name in the model ('0.weight')
    origin: str  # how it came to be computed: 'pruned via torch.nn.utils.prune', ...

    def evaluate(self, static: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
        """Its value from the sources' values in ``static``, or None if that is not a
        tensor of the traced shape and dtype."""
        values: dict[fx.Node, object] = {source: static[source] for source in self.sources}
        with torch.no_grad():
            for step in self.steps:
                args, kwargs = fx.node.map_arg((step.args, step.kwargs), values.__getitem__)
                if step.op == "call_method":
                    values[step] = getattr(args[0], step.target)(*args[1:], **kwargs)
                else:
                    values[step] = step.target(*args, **kwargs)
        value, traced = values[self.node], example_value(self.node)
        if not isinstance(value, torch.Tensor) or traced is None:
            return None
        if value.shape != traced.shape or value.dtype != traced.dtype:
            return None
        return value


def computed_weight(node, static: dict[fx.Node, torch.Tensor]) -> ComputedWeight | None:
    """``node`` as a weight computed from the static tensors of ``static`` by
    deterministic, out-of-place ops; None if it is static itself, or reads anything
    else (a graph input, a random op, an in-place op, a module call)."""
    if not isinstance(node, fx.Node) or node in static:
        return None
    steps: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if current in static:
            sources.add(current)
            continue
        if current in steps:
            continue
        if not _deterministic_out_of_place(current):
            return None
        steps.add(current)
        pending += current.all_input_nodes
    if not sources:
        return None
    ordered = tuple(n for n in node.graph.nodes if n in steps)
    source_order = tuple(n for n in node.graph.nodes if n in sources)
    name, origin = _name_and_origin(node, source_order)
    return ComputedWeight(node, source_order, ordered, name, origin)


def _deterministic_out_of_place(node: fx.Node) -> bool:
    """Whether ``node`` is a call whose ATen op (by name) neither draws random numbers
    nor writes to a tensor argument, so that evaluating it once gives every call's value."""
    if node.op not in ("call_function", "call_method") or "out" in node.kwargs:
        return False
    if node.target is operator.getitem:
        return True
    if node.op == "call_method":
        name = "to" if node.target in _CONVERSION_METHODS else node.target
    else:
        name = _ATEN_NAME_OF_OPERATOR.get(node.target, getattr(node.target, "__name__", ""))
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if torch.Tag.nondeterministic_seeded in op.tags:
            return False
        if any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments if not a.kwarg_only):
            return False
    return True


def _name_and_origin(node: fx.Node, sources: tuple[fx.Node, ...]) -> tuple[str, str]:
    """The weight's name in the model and how it came to be computed, read from its
    sources' names: ``<w>_orig`` and ``<w>_mask`` (prune), ``parametrizations.<w>.original``
    (parametrize)."""
    names = [source_name(s) for s in sources]
    for name in names:
        if name.endswith("_orig") and name[: -len("_orig")] + "_mask" in names:
            return name[: -len("_orig")], _PRUNE
    for name in names:
        parametrized = re.fullmatch(r"(?:(.*)\.)?parametrizations\.(\w+)\.original\d*", name)
        if parametrized:
            return ".".join(p for p in parametrized.groups() if p), _PARAMETRIZE
    return node.name, "computed from " + ", ".join(names)
