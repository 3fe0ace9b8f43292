"""The ``sparsecpu`` torch.compile backend.

    torch.compile(model, backend="sparsecpu", options={"min_sparsity": 0.7})

Dynamo hands us an FX graph whose parameters are placeholders and whose example
inputs are the model's real parameters. We pack the sparse float32 weights of
linears and convolutions once, rewrite their calls into ``sparsecpu::linear`` /
``sparsecpu::conv2d`` and hand the graph on to
Inductor (or run it eagerly). Packed weights belong to the weight they were packed
from: the ops run a weight edited since packing, or another instance's weight when
Dynamo shares the graph between the instances of a class, with a buffer packed from
it (csrc/ops/packed_weights.h). What a build folds into the graph (batch norms) is
checked before every call, and a change rebuilds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import _C, ops
from .passes import (
    LayerDecision,
    fetch_attr,
    find_static_tensors,
    fuse_conv_chains,
    fuse_sparse_chains,
    rewrite_sparse_layers,
)

log = logging.getLogger(__name__)

INNER_COMPILERS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class SparseCPUOptions:
    """Knobs of the backend, given as ``torch.compile(..., options={...})``.

    min_sparsity:      a linear or conv2d takes the sparse path when at least this
                       fraction of its weight is exactly zero (below it dense kernels
                       win on this class of CPU; see
                       docs/benchmarks.md#linear-layers-at-bert-base-shapes-make-bench).
    inner:             "inductor" compiles the rest of the graph; "eager" runs it as is.
    fuse_activations:  fuse a ReLU / GELU / SiLU / ReLU6 that follows a sparse layer into it.
    fuse_layers:       run sparse linears that feed each other as one op, panel of
                       tokens by panel, and sparse convolutions that do (a ResNet
                       bottleneck, its residual add included) band of rows by band,
                       so intermediates stay in cache (inference only: graphs compiled
                       with grad mode on, or that turn it on inside, keep separate layers).
    fold_batch_norm:   fold an eval-mode batch norm that follows a sparse convolution
                       into its weight and bias (inference only, like fuse_layers).
    verbose:           log each linear / conv2d taken or skipped at INFO instead of DEBUG.
    quantize:          None (fp32 everywhere, the default) or "int8": sparse linears whose
                       weights ops.int8_pays for (nonzeros in 1 x 4 blocks, or calls of at
                       most 7 tokens) run int8 kernels, fp32 in and out; explain shows each
                       layer's datatype (docs/kernels.md#int8-kernels).
    """

    min_sparsity: float = 0.6
    inner: str = "inductor"
    fuse_activations: bool = True
    fuse_layers: bool = True
    fold_batch_norm: bool = True
    verbose: bool = False
    quantize: str | None = None

    def __post_init__(self):
        if not isinstance(self.min_sparsity, (int, float)) or isinstance(self.min_sparsity, bool):
            raise TypeError(f"option 'min_sparsity' must be a number in [0, 1], got {self.min_sparsity!r}")
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"option 'min_sparsity' must be in [0, 1], got {self.min_sparsity!r}")
        if self.inner not in INNER_COMPILERS:
            raise ValueError(
                f"option 'inner' must be one of {', '.join(map(repr, INNER_COMPILERS))}, got {self.inner!r}"
            )
        if self.quantize is not None and self.quantize not in ops.QUANTIZED_DATATYPES:
            choices = ", ".join(map(repr, ops.QUANTIZED_DATATYPES))
            raise ValueError(f"option 'quantize' must be None or one of {choices}, got {self.quantize!r}")
        for flag in ("fuse_activations", "fuse_layers", "fold_batch_norm", "verbose"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"option {flag!r} must be True or False, got {getattr(self, flag)!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> SparseCPUOptions:
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(f"unknown option {key!r} for backend 'sparsecpu'; valid options: {', '.join(valid)}")
        return cls(**options)


def _inner_compile(
    gm: fx.GraphModule, example_inputs: Sequence, options: SparseCPUOptions, mode: str | None
) -> Callable:
    if options.inner == "eager":
        return gm
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, list(example_inputs), config_patches=config_patches)


@dataclasses.dataclass(frozen=True)
class _Build:
    """One build of the graph, published as a whole so that a concurrent caller sees
    either the old build or the new one, never a mix. ``baked`` checks, before each
    call, what the build baked into the graph (csrc/ops/baked_tensors.h): tensors it
    depends on (a convolution's weight or bias, a folded batch norm's parameters, a
    computed weight's sources and the constant it became), whose identity must not
    change, and the folded batch norms' statistics, whose values must not: a
    training-mode batch norm updates them in place without bumping their version. Any
    change needs a rebuild. Packed weights are not checked here: the ops check them on
    every call (csrc/ops/packed_weights.h) and run a buffer packed from the weight as it is."""

    graph_module: fx.GraphModule
    decisions: list[LayerDecision]
    baked: _C.BakedTensors | None  # None: nothing baked in (a model of linears)
    graph_inputs: list[weakref.ref]  # the arguments it was built from, held weakly
    compiled: Callable | None

    def is_stale(self, args: Sequence) -> bool:
        return self.baked is not None and self.baked.stale(tuple(args))

    def is_dead(self) -> bool:
        """Whether a tensor it was built from is gone (its module instance, say)."""
        return any(ref() is None for ref in self.graph_inputs)


def _input_spec(value):
    """What a rebuild needs of an example input: parameters and non-tensors as they
    are, other tensors as shape and strides only (never keep the user's tensor alive)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return ("value", value)


def _from_spec(spec):
    if spec[0] == "tensor":
        _, size, stride, dtype, device = spec
        return torch.empty_strided(size, stride, dtype=dtype, device=device).zero_()
    return spec[1]


class SparseCompiledGraph:
    """The callable Dynamo runs: the rewritten graph, compiled, plus the check that
    what the build folded into the graph still matches its sources."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence,
        options: SparseCPUOptions,
        mode: str | None,
        decisions: list[LayerDecision] | None = None,
    ):
        self._source_gm = gm
        self._options = options
        self._mode = mode
        self._lock = threading.Lock()
        # A rebuild re-enters Dynamo's tracing context, so that the inner compiler
        # sees the same (possibly symbolic) shapes as the first time.
        self._tracing_context = torch._guards.TracingContext.try_get()
        self._input_specs = [_input_spec(value) for value in example_inputs]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        static_nodes = find_static_tensors(gm, example_inputs)
        self._static_input_indices = [i for i, node in enumerate(placeholders) if node in static_nodes]
        self._build = self._make_build(example_inputs, compile_if_dense=False)
        # One build per set of static inputs (parameters and buffers, by object): under
        # regional compilation the instances of a module class share this graph, and each
        # keeps the build folded from its own tensors rather than rebuilding at every switch.
        self._builds = {self._static_inputs_key(example_inputs): self._build}
        if decisions is not None:
            decisions.extend(self._build.decisions)

    @property
    def decisions(self) -> list[LayerDecision]:
        return self._build.decisions

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph (before the inner compiler)."""
        return self._build.graph_module

    def _make_build(self, inputs: Sequence, compile_if_dense: bool = True) -> _Build:
        graph = fx.Graph()
        value_map: dict[fx.Node, fx.Node] = {}
        graph.output(graph.graph_copy(self._source_gm.graph, value_map))
        for old, new in value_map.items():  # keep Dynamo's sources: they name the layers
            if hasattr(old, "_dynamo_source"):
                new._dynamo_source = old._dynamo_source
        static_source = find_static_tensors(self._source_gm, inputs)
        static = {value_map[node]: value for node, value in static_source.items()}
        # Inference-only rewrites (chains, folded batch norms, computed weights) need grad mode
        # off for the whole graph: off when compiling, and not switched on inside (torch.enable_grad()).
        inference = not torch.is_grad_enabled() and not any(
            n.op == "call_function" and n.target is torch._C._set_grad_enabled for n in graph.nodes
        )
        rewritten = rewrite_sparse_layers(
            graph,
            static,
            min_sparsity=self._options.min_sparsity,
            fuse_activations=self._options.fuse_activations,
            fold_batch_norms=self._options.fold_batch_norm and inference,
            fold_computed_weights=inference,
            quantize=self._options.quantize,
        )
        if self._options.fuse_layers and inference:
            fuse_conv_chains(graph, rewritten, static)
            fuse_sparse_chains(graph)
        decisions = rewritten.decisions
        level = logging.INFO if self._options.verbose else logging.DEBUG
        if log.isEnabledFor(level):
            for decision in decisions:
                log.log(level, "%s", decision)
        # Fresh GraphModule: its root is a dict of every attribute the graph reads.
        packed = rewritten.attributes
        root = {
            n.target: fetch_attr(self._source_gm, n.target)
            for n in graph.nodes
            if n.op in ("get_attr", "call_module") and n.target not in packed
        }
        root.update(packed)
        new_gm = fx.GraphModule(root, graph, class_name="SparseCPUGraphModule")
        new_gm.meta.update(self._source_gm.meta)
        placeholder_index = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
        watched, compared = rewritten.rebuild_if_changed, rewritten.compared_by_value
        baked = None
        if watched or compared:
            with torch.no_grad():
                baked = _C.BakedTensors(
                    [static[n] for n in watched],
                    [placeholder_index.get(n, -1) for n in watched],
                    [static[n] for n in compared],
                    [placeholder_index.get(n, -1) for n in compared],
                )
        graph_inputs = [weakref.ref(static[n]) for n in watched if n in placeholder_index]
        compiled = None
        if compile_if_dense or any(d.taken for d in decisions):
            compiled = _inner_compile(new_gm, inputs, self._options, self._mode)
        return _Build(new_gm, decisions, baked, graph_inputs, compiled)

    def _rebuilt(self, args: Sequence) -> _Build:
        """The build for the tensors baked into the graph as they are now."""
        log.info("sparsecpu: tensors folded into the graph changed since it was built; rebuilding it")
        inputs = [_from_spec(spec) for spec in self._input_specs]
        for index in self._static_input_indices:  # the real parameters and buffers, never zeros
            inputs[index] = args[index]
        context = self._tracing_context
        with torch._guards.tracing(context) if context is not None else contextlib.nullcontext():
            return self._make_build(inputs)

    def _static_inputs_key(self, args: Sequence) -> tuple[int, ...]:
        return tuple(id(args[i]) for i in self._static_input_indices)

    def _build_for(self, args: Sequence) -> _Build:
        """The build for the call's static tensors as they are now: the one made from
        the same tensors before, unless they changed since, else a new one (which
        replaces it; builds whose tensors died are dropped)."""
        key = self._static_inputs_key(args)
        with self._lock:
            build = self._builds.get(key)
            if build is None or build.is_stale(args):
                build = self._rebuilt(args)
                for dead in [k for k, b in self._builds.items() if b.is_dead()]:
                    del self._builds[dead]
                self._builds[key] = build
            self._build = build
        return build

    def __call__(self, *args):
        build = self._build
        if build.is_stale(args):
            build = self._build_for(args)
        return build.compiled(*args)


def compile_sparse(
    gm: fx.GraphModule,
    example_inputs: Sequence,
    options: SparseCPUOptions,
    mode: str | None = None,
    decisions: list[LayerDecision] | None = None,
) -> Callable:
    """The backend's work, with parsed options; ``decisions`` collects what it did."""
    compiled = SparseCompiledGraph(gm, example_inputs, options, mode, decisions)
    if compiled._build.compiled is None:
        # Nothing sparse: exactly what the inner compiler alone would do.
        return _inner_compile(gm, example_inputs, options, mode)
    return compiled


def sparsecpu_backend(gm: fx.GraphModule, example_inputs: Sequence, *, options=None, mode=None):
    """The ``sparsecpu`` torch.compile backend (entry point ``torch_dynamo_backends``)."""
    return compile_sparse(gm, example_inputs, SparseCPUOptions.from_mapping(options), mode)


def explain(model: Callable, *args, **options) -> list[LayerDecision]:
    """Compiles ``model`` with the sparsecpu backend, runs it once on ``args`` and returns
    one :class:`LayerDecision` per linear or conv2d call: taken or not, sparsity, and why."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    parsed = SparseCPUOptions.from_mapping({**options, "inner": "eager"})
    decisions: list[LayerDecision] = []

    def backend(gm, example_inputs):
        return compile_sparse(gm, example_inputs, parsed, None, decisions)

    # Isolated: explain's compiled entries count against a recompile limit of their own,
    # never against the one the user's own torch.compile(model) calls share; released
    # after the run so they keep no packed weights alive.
    compiled = torch.compile(model, backend=backend, dynamic=False, isolate_recompiles=True)
    try:
        with torch.no_grad():
            compiled(*args)
    finally:
        _release_compiled_entries(compiled)
    return decisions


def _release_compiled_entries(compiled: Callable) -> None:
    """Invalidates the cache entries of one ``isolate_recompiles`` torch.compile call
    (Dynamo's own mechanism for entries whose guarded objects died). Best effort: on a
    torch whose internals differ, the entries stay, confined to their own region."""
    context = getattr(compiled, "dynamo_ctx", compiled)
    region = getattr(context, "_isolate_recompiles_id", -1)
    if region < 0:
        return
    try:
        from torch._C._dynamo.eval_frame import _get_cache_entries_for_region
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.guards import DeletedGuardManagerWrapper

        for code_ref in list(input_codes.seen):
            code = code_ref()
            for entry in _get_cache_entries_for_region(code, region) if code is not None else ():
                entry.guard_manager.extra_state.invalidate(entry, DeletedGuardManagerWrapper("explain() is done"))
    except (ImportError, AttributeError, TypeError) as error:
        log.debug("sparsecpu: explain could not release its compiled entries (%s)", error)
