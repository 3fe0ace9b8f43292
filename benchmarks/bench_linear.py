"""Sparse Linear microbenchmark on BERT-base's MLP (768 -> 3072 and 3072 -> 768).

Times ``torch_sparsecpu.ops.linear`` against dense ``F.linear`` and torch's CSR matmul at
several sparsities and token counts, after checking that each result matches dense
``F.linear``, and prints one table. The broader sweep over real-model shapes, with JSON,
markdown and a plot, is bench_spmm.py.

    python benchmarks/bench_linear.py            # the default sweep (what `make bench` runs)
    python benchmarks/bench_linear.py --quick    # smoke run: one case per shape
    python benchmarks/bench_linear.py --sparsities 90 --tokens 128 --block-cols 4 --quantize int8

Exits non-zero, reporting no timings, if any implementation gives a wrong answer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch_sparsecpu

from common import (
    COLUMNS,
    INT8_COLUMNS,
    ResultMismatch,
    add_sweep_arguments,
    describe_machine,
    enumerate_cases,
    format_text_table,
    load_shapes,
    machine_info,
    plan_summary,
    run_sweep,
    sorted_for_table,
    validate_sweep_arguments,
)

SHAPE_NAMES = ("bert.intermediate", "bert.output")
QUICK = {"sparsities": [90], "tokens": [128], "threads": [2]}

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
        "dense_gflops",
    )
]


def table_columns(args: argparse.Namespace) -> list:
    """TABLE_COLUMNS, and the int8 ones with --quantize."""
    return TABLE_COLUMNS + (INT8_COLUMNS if args.quantize else [])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, sparsities="50,70,80,90,95,99", tokens="1,32,128,512", threads="2", rounds=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 90%% sparsity, 128 tokens, 2 threads (overrides --sparsities, --tokens, --threads)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    validate_sweep_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = load_shapes(names=SHAPE_NAMES)
    cases = enumerate_cases(shapes, args.sparsities, args.tokens, args.threads)
    print(plan_summary(cases, args.min_run_time, args.rounds))
    with torch_sparsecpu.force_isa(args.isa):
        info = machine_info(args.threads, args.min_run_time, args.rounds, args.block_rows, args.block_cols)
        try:
            results = sorted_for_table(
                run_sweep(
                    cases,
                    args.min_run_time,
                    "bench_linear",
                    args.rounds,
                    args.block_rows,
                    args.block_cols,
                    args.quantize,
                )
            )
        except ResultMismatch as error:
            sys.exit(f"error: wrong result, no timings reported: {error}")
    print(f"\n{describe_machine(info)}\n")
    print(format_text_table(results, table_columns(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
