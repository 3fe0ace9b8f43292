"""BERT's FFN block (768 -> 3072 -> GELU -> 768) as sparse ops: one ``linear_chain`` against
the two layers as separate ``linear`` calls and against eager dense.

    python benchmarks/bench_ffn.py [--sparsity 90] [--tokens 128] [--threads 2] [--rounds 7]

The three are timed in interleaved rounds (medians of ``torch.utils.benchmark`` each round,
same process, same threads); the table gives the median over rounds and the chain's time
over the separate ops' in every round. Both sparse versions are checked against dense
first. ``make demo`` times the same block through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common import add_single_case_arguments, check_then_time, random_input, random_sparse_weight
from torch_sparsecpu import ops

HIDDEN, INTERMEDIATE = 768, 3072


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_single_case_arguments(parser, tokens=128, threads=2, rounds=7, min_run_time=0.3)
    args = parser.parse_args(argv)

    w1 = random_sparse_weight(INTERMEDIATE, HIDDEN, args.sparsity, seed=1, block_rows=args.block_rows)
    w2 = random_sparse_weight(HIDDEN, INTERMEDIATE, args.sparsity, seed=2, block_rows=args.block_rows)
    b1, b2 = torch.randn(INTERMEDIATE), torch.randn(HIDDEN)
    p1, p2 = ops.pack_linear(w1), ops.pack_linear(w2)
    x = random_input(args.tokens, HIDDEN, seed=3)
    candidates = {
        "eager dense": lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
        "linear_chain": lambda: ops.linear_chain(x, [w1, w2], [p1, p2], [b1, b2], ["gelu", "none"]),
        "two linear ops": lambda: ops.linear(ops.linear(x, w1, p1, b1, "gelu"), w2, p2, b2),
    }
    times = check_then_time(candidates, "eager dense", args.threads, args.rounds, args.min_run_time,
                            tolerance=1e-5)

    dense = statistics.median(times["eager dense"])
    zeros = "at random positions" if args.block_rows == 1 else f"in {args.block_rows}x1 blocks"
    print(f"FFN {HIDDEN}->{INTERMEDIATE} GELU ->{HIDDEN}, {args.sparsity}% sparse (zeros {zeros}), {args.tokens} tokens, "
          f"{args.threads} threads, medians over {args.rounds} interleaved rounds")
    for name, ms in times.items():
        print(f"  {name:>15}  {statistics.median(ms):8.3f} ms  {dense / statistics.median(ms):6.2f}x")
    ratios = [chain / separate for chain, separate in zip(times["linear_chain"], times["two linear ops"])]
    print("  linear_chain / two linear ops, per round: " + " ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
