"""Helpers shared by the sparse-Linear benchmarks (bench_spmm.py, bench_linear.py).

One place for each idea:

- layer shapes from real models (``shapes.json``) and benchmark cases built from them;
- seeded random operands: a weight with an exact sparsity, an input, the packed and CSR
  forms of the weight;
- the three implementations timed side by side: dense ``F.linear``, torch CSR and
  ``torch_sparsecpu.ops.linear``, and with ``--quantize int8`` a fourth, the same weight
  packed as int8;
- the correctness check every implementation passes before it is timed (a benchmark that
  could print a wrong-answer speed-up is a bug);
- median timing with ``torch.utils.benchmark``, in rounds that interleave the three
  implementations (``torch_sparsecpu.bench.measure.interleaved_rounds``);
- the sweep over shapes x sparsities x tokens x threads, its runtime estimate, and
  plain-text / markdown tables of the results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.benchmark import Timer
from tqdm import tqdm

import torch_sparsecpu
from torch_sparsecpu.bench.measure import (
    cpu_model_name,
    interleaved_rounds,
    relative_error,
    timing_environment,
    warn_if_threads_sleep,
)
from torch_sparsecpu.kernels import torch_threads

SHAPES_FILE = Path(__file__).with_name("shapes.json")

# An implementation's result passes when max|result - reference| <= RELATIVE_TOLERANCE *
# max|reference|. fp32 sums in another order differ by far less than this.
RELATIVE_TOLERANCE = 1e-4
# An int8 result must equal the scalar int8 kernels' (the reference the tests hold every
# int8 kernel to, exactly) to this, and dense F.linear's to QUANTIZED_TOLERANCE: its
# quantization error, about 1% of the largest output on these random operands.
INT8_KERNEL_TOLERANCE = 1e-6
QUANTIZED_TOLERANCE = 5e-2

# Calls slower than min_run_time give blocked_autorange a single sample; take more so the
# median is a median.
MIN_SAMPLES = 3


# --------------------------------------------------------------------------- shapes, cases


@dataclass(frozen=True)
class LayerShape:
    """A Linear (or a 1x1 convolution seen as a Linear over pixels) from a real model."""

    name: str
    model: str
    in_features: int
    out_features: int


def load_shapes(
    models: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    path: Path = SHAPES_FILE,
) -> list[LayerShape]:
    """Shapes from ``path`` in file order, kept if their model is in ``models`` and their
    name in ``names`` (None keeps all). Unknown model or layer names are an error."""
    shapes = [LayerShape(**entry) for entry in json.loads(path.read_text())]
    for wanted, attribute in ((models, "model"), (names, "name")):
        if wanted is None:
            continue
        known = {getattr(shape, attribute) for shape in shapes}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ValueError(
                f"unknown {attribute}(s) {', '.join(unknown)} in {path.name}; known: {', '.join(sorted(known))}"
            )
        shapes = [shape for shape in shapes if getattr(shape, attribute) in wanted]
    return shapes


@dataclass(frozen=True)
class Case:
    """One measurement: a layer shape at one sparsity, number of tokens and thread count."""

    shape: LayerShape
    sparsity_pct: int
    tokens: int
    threads: int

    @property
    def dense_flop(self) -> int:
        """Multiply-adds (x2) of the dense layer, zeros included."""
        return 2 * self.shape.in_features * self.shape.out_features * self.tokens

    def describe(self) -> str:
        shape = self.shape
        return (
            f"{shape.name} [{shape.out_features}x{shape.in_features}] "
            f"sparsity={self.sparsity_pct}% tokens={self.tokens} threads={self.threads}"
        )


def enumerate_cases(
    shapes: Iterable[LayerShape],
    sparsities_pct: Iterable[int],
    tokens: Iterable[int],
    threads: Iterable[int],
) -> list[Case]:
    """All combinations, in the order the sweep runs them (the weight changes slowest)."""
    return [
        Case(shape, sparsity, n_tokens, n_threads)
        for shape in shapes
        for sparsity in sparsities_pct
        for n_tokens in tokens
        for n_threads in threads
    ]


# --------------------------------------------------------------------------- operands


def stable_seed(*parts: object) -> int:
    """A seed that depends only on ``parts`` (unlike ``hash``, stable across processes)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def random_sparse_weight(
    out_features: int,
    in_features: int,
    sparsity_pct: int,
    seed: int,
    block_rows: int = 1,
    fill: float = 1.0,
    block_cols: int = 1,
) -> Tensor:
    """A float32 ``[out, in]`` weight with exactly ``round(sparsity * blocks)`` zero blocks
    at uniformly random positions, nonzeros drawn from N(0, 1/in_features). Blocks are
    single weights, or with ``block_rows=4`` 4 x 1 blocks (4 consecutive output rows of
    one input feature, as ``magnitude_prune_(block_rows=4)`` leaves them) when 4 divides
    ``out_features``, or with ``block_cols=4`` 1 x 4 blocks (4 consecutive input features
    of one row, what int8 kernels want) when 4 divides ``in_features``.

    ``fill`` < 1 (4 x 1 blocks only): each value of a kept block is kept with probability
    ``fill``, and fewer blocks are zero (``1 - (1 - sparsity) / fill`` of them), so the
    weight's sparsity stays about ``sparsity_pct`` while its blocks are partly filled."""
    if block_cols > 1 and in_features % block_cols == 0:  # 1 x 4 blocks: 4 x 1 blocks of the transpose
        transposed = random_sparse_weight(in_features, out_features, sparsity_pct, seed, block_cols)
        return transposed.T.contiguous() * (out_features / in_features) ** 0.5  # values ~ N(0, 1/in_features)
    rows = block_rows if out_features % block_rows == 0 else 1
    generator = torch.Generator().manual_seed(seed)
    numel = out_features * in_features
    values = torch.randn(numel, generator=generator) * in_features**-0.5
    values[values == 0] = 1.0  # keep the zero count exact, however unlikely a drawn zero is
    blocks = numel // rows
    zero_fraction = 1 - (1 - sparsity_pct / 100) / fill if rows > 1 else sparsity_pct / 100
    zero_blocks = torch.zeros(blocks, dtype=torch.bool)
    zero_blocks[torch.randperm(blocks, generator=generator)[: round(blocks * max(zero_fraction, 0.0))]] = True
    zero = zero_blocks.view(out_features // rows, 1, in_features).expand(-1, rows, -1)
    if rows > 1 and fill < 1:
        zero = zero | (torch.rand(out_features // rows, rows, in_features, generator=generator) >= fill)
    return values.view(out_features, in_features).masked_fill(zero.reshape(out_features, in_features), 0.0)


def random_input(tokens: int, in_features: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_features, generator=generator)


@dataclass
class SparseLayer:
    """A weight at one sparsity with everything the three implementations read."""

    weight: Tensor
    bias: Tensor
    packed: Tensor  # torch_sparsecpu.ops.pack_linear(weight), packed once, outside timing
    csr: Tensor  # weight.to_sparse_csr()
    nnz: int
    packed_int8: Tensor | None = None  # pack_linear(weight, quantize="int8"), with --quantize int8


def make_sparse_layer(
    shape: LayerShape, sparsity_pct: int, block_rows: int = 1, block_cols: int = 1, quantize: str | None = None
) -> SparseLayer:
    seed = stable_seed("weight", shape.name, sparsity_pct)
    weight = random_sparse_weight(
        shape.out_features, shape.in_features, sparsity_pct, seed, block_rows, block_cols=block_cols
    )
    bias = torch.randn(shape.out_features, generator=torch.Generator().manual_seed(seed + 1))
    return SparseLayer(
        weight=weight,
        bias=bias,
        packed=torch_sparsecpu.ops.pack_linear(weight),
        csr=_to_sparse_csr(weight),
        nnz=int(torch.count_nonzero(weight)),
        packed_int8=None if quantize is None else torch_sparsecpu.ops.pack_linear(weight, quantize=quantize),
    )


def _to_sparse_csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # silence "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.to_sparse_csr()


def implementations(layer: SparseLayer, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Zero-argument callables computing ``x @ weight.T + bias``: "dense" (``F.linear``),
    "csr" (torch's CSR matmul) and "sparsecpu" (``torch_sparsecpu.ops.linear``), and
    "sparsecpu_int8" (the same op on the int8 buffer) when the layer has one."""
    weight, bias, packed, csr = layer.weight, layer.bias, layer.packed, layer.csr
    candidates = {
        "dense": lambda: F.linear(x, weight, bias),
        # torch has no sparse-weight linear: the CSR weight multiplies x feature-major.
        "csr": lambda: (csr @ x.T).T + bias,
        "sparsecpu": lambda: torch_sparsecpu.ops.linear(x, weight, packed, bias),
    }
    if layer.packed_int8 is not None:
        packed_int8 = layer.packed_int8
        candidates["sparsecpu_int8"] = lambda: torch_sparsecpu.ops.linear(x, weight, packed_int8, bias)
    return candidates


# --------------------------------------------------------------------------- checking, timing


class ResultMismatch(RuntimeError):
    """An implementation disagrees with the dense reference: no timing of it may be shown."""


def check_against_reference(
    implementation: str, got: Tensor, reference: Tensor, case: Case, tolerance: float = RELATIVE_TOLERANCE
) -> None:
    """Raises :class:`ResultMismatch` naming the case unless ``got`` matches ``reference``
    within ``tolerance`` of its largest magnitude (NaNs never match)."""
    if got.shape != reference.shape:
        raise ResultMismatch(
            f"{implementation} returned shape {tuple(got.shape)}, expected {tuple(reference.shape)}: {case.describe()}"
        )
    difference = (got - reference).abs().nan_to_num(nan=float("inf"))
    error = difference.max().item()
    allowed = tolerance * reference.abs().max().item()
    if not error <= allowed:
        token, output = divmod(int(difference.argmax()), reference.shape[-1])
        raise ResultMismatch(
            f"{implementation} differs from its reference by {error:.3g} at "
            f"[token {token}, output {output}] (tolerance {allowed:.3g}): {case.describe()}"
        )


def median_ms(
    fn: Callable[[], Tensor], threads: int, min_run_time: float, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time of one ``fn()`` call in milliseconds by ``clock`` (wall time; with
    ``time.process_time`` the CPU time of all the process's threads), from
    ``Timer.blocked_autorange``; calls slower than ``min_run_time`` get timed again by
    hand until there are MIN_SAMPLES samples (``Timer.timeit`` would add warm-up calls)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=clock)
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    with torch_threads(threads):
        while len(times) < MIN_SAMPLES:
            start = clock()
            fn()
            times.append(clock() - start)
    return statistics.median(times) * 1e3


def check_then_time(
    candidates: dict[str, Callable[[], Tensor]],
    reference: str,
    threads: int,
    rounds: int,
    min_run_time: float,
    tolerance: float = RELATIVE_TOLERANCE,
    expected_results: Mapping[str, Tensor] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    tolerances: Mapping[str, float] | None = None,
) -> dict[str, list[float]]:
    """Checks every candidate against ``candidates[reference]`` (max |difference| <=
    ``tolerance`` * max |reference|, or the candidate's entry of ``tolerances``, e.g. a
    quantized path's; a wrong one exits, reporting no timings), or against
    its entry of ``expected_results`` when it has one (a candidate that computes something
    else, timed alongside), then times them all in ``rounds`` interleaved rounds: per
    candidate, one :func:`median_ms` per round (by ``clock``), so a slow spell of the
    machine hits every candidate alike."""
    expected_results = expected_results or {}
    with torch_threads(threads):
        expected = candidates[reference]()
        for name, fn in candidates.items():
            error = relative_error(fn(), expected_results.get(name, expected))
            if not error <= (tolerances or {}).get(name, tolerance):
                sys.exit(f"error: {name}: wrong result (max error {error:.3g} relative), no timings reported")
    return interleaved_rounds(
        candidates, rounds, functools.partial(median_ms, threads=threads, min_run_time=min_run_time, clock=clock)
    )


# --------------------------------------------------------------------------- results


@dataclass
class CaseResult:
    """Median times of the three implementations on one case and the figures derived."""

    case: Case
    nnz: int
    dense_ms: float
    csr_ms: float
    sparsecpu_ms: float
    int8_ms: float | None = None  # the int8 buffer's, with --quantize int8

    @property
    def speedup_vs_dense(self) -> float:
        return self.dense_ms / self.sparsecpu_ms

    @property
    def speedup_vs_csr(self) -> float:
        return self.csr_ms / self.sparsecpu_ms

    @property
    def int8_speedup_vs_f32(self) -> float | None:
        """How much faster the int8 buffer runs than the fp32 one of the same weight."""
        return None if self.int8_ms is None else self.sparsecpu_ms / self.int8_ms

    @property
    def int8_speedup_vs_dense(self) -> float | None:
        return None if self.int8_ms is None else self.dense_ms / self.int8_ms

    @property
    def sparsecpu_nnz_gflops(self) -> float:
        """GFLOP/s over nonzeros: the multiply-adds sparsecpu really does per second."""
        return 2 * self.nnz * self.case.tokens / (self.sparsecpu_ms * 1e6)

    @property
    def dense_gflops(self) -> float:
        """GFLOP/s of dense F.linear on the same shape (zeros counted: it multiplies them)."""
        return self.case.dense_flop / (self.dense_ms * 1e6)

    @property
    def nnz_gflops_pct_of_dense(self) -> float:
        """How close sparsecpu's useful FLOP rate comes to dense GEMM's rate, in percent."""
        return 100 * self.sparsecpu_nnz_gflops / self.dense_gflops

    def to_dict(self) -> dict:
        case = self.case
        return {
            **asdict(case.shape),
            "sparsity_pct": case.sparsity_pct,
            "tokens": case.tokens,
            "threads": case.threads,
            "nnz": self.nnz,
            "dense_ms": self.dense_ms,
            "csr_ms": self.csr_ms,
            "sparsecpu_ms": self.sparsecpu_ms,
            "speedup_vs_dense": self.speedup_vs_dense,
            "speedup_vs_csr": self.speedup_vs_csr,
            "sparsecpu_nnz_gflops": self.sparsecpu_nnz_gflops,
            "dense_gflops": self.dense_gflops,
            "nnz_gflops_pct_of_dense": self.nnz_gflops_pct_of_dense,
            "int8_ms": self.int8_ms,
            "int8_speedup_vs_f32": self.int8_speedup_vs_f32,
        }


# --------------------------------------------------------------------------- the sweep

# Rough rates on a 2-core AVX2 machine, for the runtime estimate only (GFLOP/s per thread).
_ESTIMATE_GFLOPS_PER_THREAD = {"dense": 20.0, "csr": 3.0, "sparsecpu": 12.0}
_ESTIMATE_SETUP_NS_PER_WEIGHT = 60.0  # random weight, packing, CSR conversion


def split_by_size(cases: Sequence[Case], max_dense_gflop: float | None) -> tuple[list[Case], list[Case]]:
    """(cases to run, cases skipped because the dense layer is over ``max_dense_gflop``)."""
    if max_dense_gflop is None:
        return list(cases), []
    keep = [case for case in cases if case.dense_flop <= max_dense_gflop * 1e9]
    skip = [case for case in cases if case.dense_flop > max_dense_gflop * 1e9]
    return keep, skip


def estimate_seconds(cases: Sequence[Case], min_run_time: float, rounds: int = 1) -> float:
    """A rough forecast of :func:`run_sweep`'s wall time from nominal FLOP rates."""

    def timing_seconds(call: float) -> float:
        # warm-up / block-size estimate, then at least min_run_time or MIN_SAMPLES calls
        return call + max(min_run_time, MIN_SAMPLES * call)

    total = 0.0
    weights_made = set()
    for case in cases:
        nnz_flop = case.dense_flop * (1 - case.sparsity_pct / 100)
        rates = {name: gflops * case.threads * 1e9 for name, gflops in _ESTIMATE_GFLOPS_PER_THREAD.items()}
        calls = {
            "dense": case.dense_flop / rates["dense"],
            "csr": nnz_flop / rates["csr"],
            "sparsecpu": nnz_flop / rates["sparsecpu"],
        }
        total += sum(calls.values())  # correctness check
        total += rounds * sum(timing_seconds(call) for call in calls.values())
        if (case.shape, case.sparsity_pct) not in weights_made:
            weights_made.add((case.shape, case.sparsity_pct))
            numel = case.shape.in_features * case.shape.out_features
            total += numel * _ESTIMATE_SETUP_NS_PER_WEIGHT * 1e-9
    return total


def plan_summary(cases: Sequence[Case], min_run_time: float, rounds: int = 1) -> str:
    """How many cases will run and roughly how long they will take."""
    estimate = format_duration(estimate_seconds(cases, min_run_time, rounds))
    return (
        f"{len(cases)} cases x {rounds} round(s); estimated runtime {estimate} "
        "(rough: from nominal FLOP rates; the progress bar's ETA is better once started)"
    )


def run_sweep(
    cases: Sequence[Case],
    min_run_time: float,
    description: str,
    rounds: int = 1,
    block_rows: int = 1,
    block_cols: int = 1,
    quantize: str | None = None,
) -> list[CaseResult]:
    """Checks then times every case, on weights with zeros in ``block_rows`` x
    ``block_cols`` blocks (:func:`random_sparse_weight`); with ``quantize`` also the weight
    packed so, checked against the scalar int8 kernels and (loosely) dense.

    Each weight is built and packed once and serves the run of consecutive cases that share
    it (all its token and thread counts, in the order of :func:`enumerate_cases`). A case
    is timed in ``rounds`` rounds, each timing dense, CSR and sparsecpu one after the
    other, and each implementation's time is its median over the rounds: dense is timed
    next to the sparse kernels it is compared with, so a slow spell of a noisy machine
    hits both. Raises :class:`ResultMismatch` on a wrong answer.
    """
    results = []
    with tqdm(total=len(cases), desc=description, unit="case", dynamic_ncols=True) as progress:
        for (shape, sparsity_pct), layer_cases in groupby(cases, key=lambda case: (case.shape, case.sparsity_pct)):
            layer = make_sparse_layer(shape, sparsity_pct, block_rows, block_cols, quantize)
            for tokens, token_cases in groupby(layer_cases, key=lambda case: case.tokens):
                x = random_input(tokens, shape.in_features, stable_seed("input", shape.name, tokens))
                reference = F.linear(x, layer.weight, layer.bias)
                candidates = implementations(layer, x)
                if quantize is not None:
                    with torch_sparsecpu.force_isa("scalar"):
                        int8_reference = torch_sparsecpu.ops.linear(x, layer.weight, layer.packed_int8, layer.bias)
                for case in token_cases:
                    progress.set_postfix_str(case.describe(), refresh=True)
                    with torch_threads(case.threads):
                        for name in ("csr", "sparsecpu"):
                            check_against_reference(name, candidates[name](), reference, case)
                        if quantize is not None:
                            int8 = candidates["sparsecpu_int8"]()
                            check_against_reference("int8", int8, int8_reference, case, INT8_KERNEL_TOLERANCE)
                            check_against_reference("int8", int8, reference, case, QUANTIZED_TOLERANCE)
                    measure = functools.partial(median_ms, threads=case.threads, min_run_time=min_run_time)
                    times = interleaved_rounds(candidates, rounds, measure)
                    results.append(
                        CaseResult(
                            case=case,
                            nnz=layer.nnz,
                            dense_ms=statistics.median(times["dense"]),
                            csr_ms=statistics.median(times["csr"]),
                            sparsecpu_ms=statistics.median(times["sparsecpu"]),
                            int8_ms=statistics.median(times["sparsecpu_int8"]) if quantize else None,
                        )
                    )
                    progress.update()
    return results


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """A table column: its header, how to read a value from a result, how to format it."""

    header: str
    value: Callable[[CaseResult], object]
    fmt: str = ""  # format spec, e.g. ".2f"
    numeric: bool = True  # numbers align right, text left


COLUMNS = {
    "shape": Column("shape", lambda r: r.case.shape.name, numeric=False),
    "size": Column("out x in", lambda r: f"{r.case.shape.out_features}x{r.case.shape.in_features}"),
    "sparsity": Column("sparsity %", lambda r: r.case.sparsity_pct),
    "tokens": Column("tokens", lambda r: r.case.tokens),
    "threads": Column("threads", lambda r: r.case.threads),
    "dense_ms": Column("dense ms", lambda r: r.dense_ms, ".3f"),
    "csr_ms": Column("CSR ms", lambda r: r.csr_ms, ".3f"),
    "sparsecpu_ms": Column("sparsecpu ms", lambda r: r.sparsecpu_ms, ".3f"),
    "speedup_vs_dense": Column("x dense", lambda r: r.speedup_vs_dense, ".2f"),
    "speedup_vs_csr": Column("x CSR", lambda r: r.speedup_vs_csr, ".2f"),
    "nnz_gflops": Column("GFLOP/s nnz", lambda r: r.sparsecpu_nnz_gflops, ".1f"),
    "dense_gflops": Column("dense GFLOP/s", lambda r: r.dense_gflops, ".1f"),
    "pct_of_dense": Column("% dense GFLOP/s", lambda r: r.nnz_gflops_pct_of_dense, ".0f"),
    "int8_ms": Column("int8 ms", lambda r: r.int8_ms, ".3f"),
    "int8_vs_f32": Column("int8 x fp32", lambda r: r.int8_speedup_vs_f32, ".2f"),
    "int8_vs_dense": Column("int8 x dense", lambda r: r.int8_speedup_vs_dense, ".2f"),
}
# The columns --quantize int8 adds to a table.
INT8_COLUMNS = [COLUMNS[key] for key in ("int8_ms", "int8_vs_f32", "int8_vs_dense")]


def sorted_for_table(results: Sequence[CaseResult]) -> list[CaseResult]:
    """Results grouped by shape (in sweep order), then threads, then tokens, with sparsity
    changing fastest so that each group reads as a speed-up-vs-sparsity curve."""
    shape_order = {shape: i for i, shape in enumerate(dict.fromkeys(r.case.shape for r in results))}

    def key(result: CaseResult) -> tuple:
        case = result.case
        return shape_order[case.shape], case.threads, case.tokens, case.sparsity_pct

    return sorted(results, key=key)


def _cells(results: Sequence[CaseResult], columns: Sequence[Column]) -> list[list[str]]:
    return [[format(column.value(r), column.fmt) for column in columns] for r in results]


def format_text_table(results: Sequence[CaseResult], columns: Sequence[Column]) -> str:
    """An aligned plain-text table, one row per result."""
    rows = _cells(results, columns)
    widths = [max([len(column.header)] + [len(row[i]) for row in rows]) for i, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if column.numeric else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ).rstrip()

    header = line([column.header for column in columns])
    return "\n".join([header, "-" * len(header), *map(line, rows)])


def format_markdown_table(results: Sequence[CaseResult], columns: Sequence[Column]) -> str:
    """The same table in GitHub markdown, numbers right-aligned."""
    rule = ["---:" if column.numeric else ":---" for column in columns]
    lines = [[column.header for column in columns], rule, *_cells(results, columns)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# --------------------------------------------------------------------------- command line


def parse_int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers: ``"50,70,90"``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_sweep_arguments(
    parser: argparse.ArgumentParser, *, sparsities: str, tokens: str, threads: str, min_run_time=0.2, rounds=1
) -> None:
    """The arguments both benchmarks take, with each script's defaults."""
    for flag, default, what in (
        ("--sparsities", sparsities, "percent of zero weights"),
        ("--tokens", tokens, "rows of the input"),
        ("--threads", threads, "torch thread counts"),
    ):
        parser.add_argument(
            flag,
            type=parse_int_list,
            default=parse_int_list(default),
            help=f"{what}, comma-separated (default {default})",
        )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=min_run_time,
        help=f"seconds per blocked_autorange measurement (default {min_run_time})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help="rounds per case, each timing dense, CSR and sparsecpu in turn; "
        f"medians over rounds are reported (default {rounds})",
    )
    parser.add_argument(
        "--block-rows",
        type=int,
        choices=(1, 4),
        default=1,
        help="1: zeros at random positions (default); 4: whole 4 x 1 blocks of "
        "zeros, as magnitude_prune_(block_rows=4) leaves them",
    )
    parser.add_argument(
        "--block-cols",
        type=int,
        choices=(1, 4),
        default=1,
        help="4: whole 1 x 4 blocks of zeros (4 consecutive input features of a row), what int8 kernels want",
    )
    parser.add_argument(
        "--quantize",
        choices=torch_sparsecpu.ops.QUANTIZED_DATATYPES,
        default=None,
        help="also time the weight packed with pack_linear(quantize=...) (columns int8 ms, int8 x fp32, int8 x dense)",
    )
    parser.add_argument(
        "--isa",
        choices=torch_sparsecpu.available_isas(),
        default=torch_sparsecpu.isa(),
        help=f"sparsecpu kernels to run (default: {torch_sparsecpu.isa()}, the best this CPU has)",
    )


def add_single_case_arguments(
    parser: argparse.ArgumentParser, *, tokens: int, threads: int, rounds: int, min_run_time: float
) -> None:
    """The arguments of the benchmarks that time one case several ways (bench_ffn.py,
    bench_packing.py), with each script's defaults."""
    parser.add_argument("--sparsity", type=int, default=90, help="percent of zero weights")
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds; medians are reported")
    parser.add_argument("--min-run-time", type=float, default=min_run_time)
    parser.add_argument(
        "--block-rows",
        type=int,
        choices=(1, 4),
        default=1,
        help="1: zeros at random positions (default); 4: zeros in 4 x 1 blocks",
    )


def validate_sweep_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for sparsity in args.sparsities:
        if not 0 <= sparsity <= 100:
            parser.error(f"--sparsities must lie in 0..100, got {sparsity}")
    if min(args.tokens) < 1:
        parser.error("--tokens must be >= 1")
    if min(args.threads) < 1:
        parser.error("--threads must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        print(f"warning: --threads {max(args.threads)} is more than this machine's {cpus} CPUs", file=sys.stderr)


def describe_weights(block_rows: int = 1, block_cols: int = 1) -> str:
    if block_rows == 1 and block_cols == 1:
        return "zeros at random positions"
    return f"zeros in random {block_rows}x{block_cols} blocks"


def machine_info(
    threads: Sequence[int], min_run_time: float, rounds: int = 1, block_rows: int = 1, block_cols: int = 1
) -> dict:
    """What a reader needs to compare these numbers with others."""
    warn_if_threads_sleep()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        # other processes' load skews timings, worst at threads == CPUs
        "load_average_1min_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_sparsecpu": torch_sparsecpu.__version__,
        "isa": torch_sparsecpu.isa(),
        "available_isas": torch_sparsecpu.available_isas(),
        "environment": timing_environment(),
        "threads": list(threads),
        "min_run_time_s": min_run_time,
        "rounds": rounds,
        "weights": describe_weights(block_rows, block_cols),
        "timing": "median of torch.utils.benchmark.Timer.blocked_autorange "
        f"(at least {MIN_SAMPLES} samples), median over {rounds} interleaved round(s)",
    }


def describe_machine(info: dict) -> str:
    """One line for the head of a printed table."""
    return (
        f"{info['cpu']} ({info['logical_cpus']} CPUs), torch {info['torch']}, "
        f"sparsecpu ISA {info['isa']}, {info['weights']}, {info['timing']}"
    )


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
