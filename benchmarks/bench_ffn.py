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

from common import median_ms, random_input, random_sparse_weight
from torch_sparsecpu.kernels import torch_threads
from torch_sparsecpu import ops

HIDDEN, INTERMEDIATE = 768, 3072


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=int, default=90, help="percent of zero weights")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--block-rows", type=int, choices=(1, 4), default=1,
                        help="1: zeros at random positions (default); 4: zeros in 4 x 1 blocks")
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
    with torch_threads(args.threads):
        reference = candidates["eager dense"]()
        for name in ("linear_chain", "two linear ops"):
            error = (candidates[name]() - reference).abs().max().item()
            if not error <= 1e-5 * reference.abs().max().item():
                sys.exit(f"error: {name}: wrong result (max error {error:.3g}), no timings reported")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            times[name].append(median_ms(fn, args.threads, args.min_run_time))

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
