"""Packings of one layer side by side: the evidence behind the packing defaults.

Packs one weight from ``shapes.json`` several ways (``k_block`` / ``row_block`` /
``block_rows``) and
times ``torch_sparsecpu.ops.linear`` on each, interleaved with dense ``F.linear`` in every
round, in one process with the same threads, after checking each result against dense.

    python benchmarks/bench_packing.py --shape bert.intermediate --sparsity 90 --tokens 64 \\
        --threads 1 --packings auto/32,auto/128,128/128

A packing is ``K/R`` or ``K/R/B``: ``K`` the K-block (``auto``: ``ops.default_k_block``,
``0``: one block), ``R`` the row block, ``B`` the block rows (1 or 4; default: what
``ops.default_block_rows`` picks). For example, whether partly filled 4 x 1 blocks are
worth packing as such:

    python benchmarks/bench_packing.py --block-rows 4 --fill 0.7 --tokens 128 --threads 2 \
        --packings auto/128/1,auto/128/4
 Prints each packing's median over rounds, its speed-up over
dense and GFLOP/s over nonzeros; exits non-zero, reporting no timings, on a wrong result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch.nn.functional as F

import torch_sparsecpu

from common import (
    add_single_case_arguments,
    check_then_time,
    load_shapes,
    random_input,
    random_sparse_weight,
    stable_seed,
)


def parse_packing(text: str) -> tuple[int | None, int, int | None]:
    """argparse type for ``K/R[/B]``: (k_block or None for auto, row_block, block_rows or None)."""
    try:
        k_block, row_block, *block_rows = text.split("/")
        if len(block_rows) > 1:
            raise ValueError
        return (
            (None if k_block == "auto" else int(k_block)),
            int(row_block),
            int(block_rows[0]) if block_rows else None,
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/R or K/R/B such as auto/128 or 256/32/4, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bert.intermediate", help="a layer name from shapes.json")
    add_single_case_arguments(parser, tokens=64, threads=1, rounds=5, min_run_time=0.2)
    parser.add_argument(
        "--fill",
        type=float,
        default=1.0,
        help="with --block-rows 4: fraction of each kept block's values that are nonzero",
    )
    parser.add_argument(
        "--packings",
        type=lambda text: [parse_packing(p) for p in text.split(",")],
        default=[(None, 32, None), (None, torch_sparsecpu.ops.DEFAULT_ROW_BLOCK, None)],
        help="comma-separated K/R or K/R/B (default: auto/32,auto/<DEFAULT_ROW_BLOCK>)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.fill <= 1 or (args.fill < 1 and args.block_rows != 4):
        parser.error("--fill must lie in (0, 1], and below 1 only with --block-rows 4")

    (shape,) = load_shapes(names=[args.shape])
    weight = random_sparse_weight(
        shape.out_features,
        shape.in_features,
        args.sparsity,
        stable_seed("weight", shape.name, args.sparsity),
        args.block_rows,
        args.fill,
    )
    x = random_input(args.tokens, shape.in_features, seed=stable_seed("input", args.tokens))
    packed = {
        f"{'auto' if k is None else k}/{r}" + ("" if b is None else f"/{b}"): torch_sparsecpu.ops.pack_linear(
            weight, k_block=k, row_block=r, block_rows=b
        )
        for k, r, b in args.packings
    }
    candidates = {"dense": lambda: F.linear(x, weight)}
    for name, buffer in packed.items():
        candidates[name] = lambda buffer=buffer: torch_sparsecpu.ops.linear(x, weight, buffer)

    times = check_then_time(candidates, "dense", args.threads, args.rounds, args.min_run_time)

    nnz_flops = 2 * int(weight.count_nonzero()) * args.tokens
    dense_ms = statistics.median(times["dense"])
    fill = f" in 4x1 blocks filled {args.fill:.0%}" if args.block_rows == 4 else ""
    print(
        f"{shape.name} [{shape.out_features}x{shape.in_features}], {args.sparsity}% sparse{fill}, "
        f"{args.tokens} tokens, {args.threads} thread(s), medians over {args.rounds} interleaved rounds"
    )
    print(f"{'packing K/R':>14} {'ms':>9} {'x dense':>8} {'GFLOP/s nnz':>12}")
    for name, values in times.items():
        ms = statistics.median(values)
        rate = "" if name == "dense" else f"{nnz_flops / ms / 1e6:12.1f}"
        print(f"{name:>14} {ms:9.3f} {dense_ms / ms:7.2f}x {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
