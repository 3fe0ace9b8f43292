"""Sparse x dense matrix multiply on layer shapes from real models.

For every shape in shapes.json (BERT-base, ResNet-50 1x1 convolutions seen as Linears over
pixels, MobileNet-v2 pointwise convolutions, LLaMA-7B MLP), sparsity, number of tokens and
thread count, this times ``torch_sparsecpu.ops.linear`` against dense ``F.linear`` and
torch's CSR matmul, after checking that each result matches dense ``F.linear``.

    python benchmarks/bench_spmm.py --quick          # smoke run, seconds
    python benchmarks/bench_spmm.py                  # full sweep, prints its estimated runtime
    python benchmarks/bench_spmm.py --shapes resnet50,mobilenet_v2 --threads 1 --dry-run
    python benchmarks/bench_spmm.py --quick --block-cols 4 --quantize int8   # int8 next to fp32

Writes <out>/bench_spmm.json (results and machine info), <out>/bench_spmm.md (the table for
the docs) and <out>/bench_spmm.png (speed-up vs sparsity, one line per shape).
Exits non-zero, reporting no timings, if any implementation gives a wrong answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

import torch_sparsecpu

from common import (
    COLUMNS,
    INT8_COLUMNS,
    Case,
    CaseResult,
    LayerShape,
    ResultMismatch,
    add_sweep_arguments,
    describe_machine,
    enumerate_cases,
    format_duration,
    format_markdown_table,
    format_text_table,
    load_shapes,
    machine_info,
    plan_summary,
    run_sweep,
    sorted_for_table,
    split_by_size,
    validate_sweep_arguments,
)

matplotlib.use("Agg")  # write image files, never open a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

DEFAULT_OUT = Path(__file__).with_name("out")
QUICK = {"shapes": ["bert-base"], "sparsities": [90], "tokens": [128], "threads": [2]}

TABLE_COLUMNS = [
    COLUMNS[key]
    for key in (
        "shape",
        "size",
        "sparsity",
        "tokens",
        "threads",
        "dense_ms",
        "csr_ms",
        "sparsecpu_ms",
        "speedup_vs_dense",
        "speedup_vs_csr",
        "nnz_gflops",
        "pct_of_dense",
    )
]


def table_columns(args: argparse.Namespace) -> list:
    """TABLE_COLUMNS, and the int8 ones with --quantize."""
    return TABLE_COLUMNS + (INT8_COLUMNS if args.quantize else [])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, sparsities="50,70,80,90,95,98", tokens="1,8,64,128,512,2048", threads="1,2")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: BERT shapes, 90%% sparsity, 128 tokens, 2 threads "
        "(overrides --shapes, --sparsities, --tokens, --threads)",
    )
    parser.add_argument(
        "--shapes",
        type=lambda text: [name for name in text.split(",") if name],
        help="models to run, comma-separated (the 'model' field of shapes.json); default all",
    )
    parser.add_argument(
        "--max-dense-gflop",
        type=float,
        default=12.0,
        help="skip cases whose dense layer does more than this many GFLOP per call "
        "(default 12: skips LLaMA MLP at 512+ tokens); 0 disables the cap",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory for bench_spmm.{json,md,png} (default benchmarks/out)"
    )
    parser.add_argument(
        "--plot-tokens", type=int, default=128, help="tokens of the plotted cases (default 128; else the nearest swept)"
    )
    parser.add_argument(
        "--plot-threads", type=int, default=2, help="threads of the plotted cases (default 2; else the nearest swept)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cases' count and estimated runtime, run nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    validate_sweep_arguments(parser, args)
    return args


def nearest(values: Sequence[int], target: int) -> int:
    return min(values, key=lambda value: (abs(value - target), value))


def speedup_tick_label(value: float, _position) -> str:
    """'0.5x', '1x', '2x', '5x', '10x'...: log-axis ticks at 1, 2, 5 times a power of ten."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}x" if round(mantissa, 6) in (1, 2, 5) else ""


def line_styles(shapes: Sequence[LayerShape]) -> dict[LayerShape, dict]:
    """Plot keyword arguments per shape: one marker and line style per model, colours
    cycling through a model's shapes."""
    models = list(dict.fromkeys(shape.model for shape in shapes))
    colors = matplotlib.colormaps["tab10"].colors
    styles = {}
    for shape in shapes:
        model_index = models.index(shape.model)
        index_in_model = sum(other.model == shape.model for other in styles)
        styles[shape] = {
            "marker": "osD^vP*X"[model_index % 8],
            "linestyle": ("-", "--", "-.", ":")[model_index % 4],
            "color": colors[index_in_model % len(colors)],
        }
    return styles


def plot_speedups(results: Sequence[CaseResult], tokens: int, threads: int, info: dict, path: Path) -> None:
    """Speed-up of sparsecpu vs sparsity, over dense F.linear (left) and torch CSR (right),
    one line per shape, for one tokens / threads pair."""
    selected = [r for r in results if r.case.tokens == tokens and r.case.threads == threads]
    by_shape: dict[LayerShape, list[CaseResult]] = {}
    for result in selected:
        by_shape.setdefault(result.case.shape, []).append(result)
    styles = line_styles(list(by_shape))

    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    for ax, attribute, title in (
        (axes[0], "speedup_vs_dense", "over dense F.linear"),
        (axes[1], "speedup_vs_csr", "over torch CSR"),
    ):
        for shape, shape_results in by_shape.items():
            shape_results.sort(key=lambda r: r.case.sparsity_pct)
            ax.plot(
                [r.case.sparsity_pct for r in shape_results],
                [getattr(r, attribute) for r in shape_results],
                **styles[shape],
                label=f"{shape.name} ({shape.out_features}x{shape.in_features})",
            )
        ax.axhline(1.0, color="black", linewidth=1.0, alpha=0.6)  # break-even
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(speedup_tick_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(speedup_tick_label))
        ax.set_xlabel("sparsity (% zero weights)")
        ax.set_ylabel("speed-up of sparsecpu")
        ax.set_title(f"Speed-up {title}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize="small")
    figure.suptitle(
        f"sparsecpu.linear, {tokens} tokens, {threads} thread{'s' if threads > 1 else ''}, "
        f"ISA {info['isa']} - {info['cpu']}, torch {info['torch']}"
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)


def skipped_summary(skipped: Sequence[Case], max_dense_gflop: float) -> str:
    pairs = dict.fromkeys((case.shape.name, case.tokens, case.dense_flop) for case in skipped)
    listed = ", ".join(f"{name} @ {tokens} tokens ({flop / 1e9:.0f} GFLOP)" for name, tokens, flop in pairs)
    return f"skipping {len(skipped)} cases over --max-dense-gflop={max_dense_gflop:g}: {listed}"


def write_outputs(
    out: Path,
    info: dict,
    settings: dict,
    results: Sequence[CaseResult],
    skipped: Sequence[Case],
    plot_tokens: int,
    plot_threads: int,
    columns: Sequence,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": info,
        "settings": settings,
        "results": [r.to_dict() for r in results],
        "skipped": [
            {
                "name": c.shape.name,
                "sparsity_pct": c.sparsity_pct,
                "tokens": c.tokens,
                "threads": c.threads,
                "dense_gflop": c.dense_flop / 1e9,
            }
            for c in skipped
        ],
    }
    (out / "bench_spmm.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench_spmm.md").write_text(
        f"Sparse Linear on real-model shapes ({describe_machine(info)}). "
        "`x dense` and `x CSR`: speed-up of sparsecpu over dense `F.linear` and torch CSR; "
        "`GFLOP/s nnz`: 2 * nonzeros * tokens / time; `% dense GFLOP/s`: that rate over "
        "dense `F.linear`'s own GFLOP/s on the same shape; with `--quantize int8`, `int8 ms` is the same weight "
        "packed as int8 and `int8 x fp32` its speed-up over the fp32 buffer.\n\n"
        + format_markdown_table(results, columns)
        + "\n"
    )
    plot_speedups(results, plot_tokens, plot_threads, info, out / "bench_spmm.png")
    print(
        f"wrote {out / 'bench_spmm.json'}, {out / 'bench_spmm.md'}, "
        f"{out / 'bench_spmm.png'} (plot: tokens={plot_tokens}, threads={plot_threads})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shapes = load_shapes(models=args.shapes)
    except ValueError as error:
        sys.exit(f"error: --shapes: {error}")
    cases, skipped = split_by_size(
        enumerate_cases(shapes, args.sparsities, args.tokens, args.threads),
        args.max_dense_gflop or None,
    )
    if skipped:
        print(skipped_summary(skipped, args.max_dense_gflop))
    print(plan_summary(cases, args.min_run_time, args.rounds))
    if args.dry_run or not cases:
        return 0

    started = time.perf_counter()
    with torch_sparsecpu.force_isa(args.isa):
        info = machine_info(args.threads, args.min_run_time, args.rounds, args.block_rows, args.block_cols)
        try:
            results = sorted_for_table(
                run_sweep(
                    cases, args.min_run_time, "bench_spmm", args.rounds, args.block_rows, args.block_cols, args.quantize
                )
            )
        except ResultMismatch as error:
            sys.exit(f"error: wrong result, no timings reported: {error}")
    elapsed = time.perf_counter() - started

    print(f"\n{describe_machine(info)}\n")
    print(format_text_table(results, table_columns(args)))
    print(f"\n{len(results)} cases in {format_duration(elapsed)}")
    settings = {
        "shapes": [shape.name for shape in shapes],
        "sparsities_pct": args.sparsities,
        "tokens": args.tokens,
        "threads": args.threads,
        "max_dense_gflop": args.max_dense_gflop,
        "quantize": args.quantize,
        "elapsed_s": round(elapsed, 1),
    }
    write_outputs(
        args.out,
        info,
        settings,
        results,
        skipped,
        nearest(args.tokens, args.plot_tokens),
        nearest(args.threads, args.plot_threads),
        table_columns(args),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
