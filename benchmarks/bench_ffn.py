"""BERT's FFN block (768 -> 3072 -> GELU -> 768): the module compiled with
``backend="sparsecpu"``, one ``linear_chain`` op, the two layers as separate ``linear``
calls, and eager dense.

    python benchmarks/bench_ffn.py [--sparsity 90] [--tokens 128] [--threads 2] [--rounds 7]

The four are timed in interleaved rounds (medians of ``torch.utils.benchmark`` each round,
same process, same threads); the table gives the median over rounds, then per round the
chain's time over the separate ops' and the compiled module's over the chain's (what
Dynamo's guards and the wrappers add to the op). Every sparse version is checked against
dense first. The compiled module runs under ``torch.inference_mode`` (the backend fuses
the two layers into one chain only with grad mode off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torch_sparsecpu import ops

from common import add_single_case_arguments, check_then_time, random_input, random_sparse_weight

HIDDEN, INTERMEDIATE = 768, 3072


def compiled_ffn(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.nn.Module:
    """The block as a user writes it, holding the given weights (not yet compiled)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, INTERMEDIATE), torch.nn.GELU(), torch.nn.Linear(INTERMEDIATE, HIDDEN)
    ).eval()
    with torch.no_grad():
        for layer, weight, bias in ((model[0], w1, b1), (model[2], w2, b2)):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_single_case_arguments(parser, tokens=128, threads=2, rounds=7, min_run_time=0.3)
    args = parser.parse_args(argv)

    w1 = random_sparse_weight(INTERMEDIATE, HIDDEN, args.sparsity, seed=1, block_rows=args.block_rows)
    w2 = random_sparse_weight(HIDDEN, INTERMEDIATE, args.sparsity, seed=2, block_rows=args.block_rows)
    b1, b2 = torch.randn(INTERMEDIATE), torch.randn(HIDDEN)
    p1, p2 = ops.pack_linear(w1), ops.pack_linear(w2)
    x = random_input(args.tokens, HIDDEN, seed=3)
    compiled = torch.compile(compiled_ffn(w1, b1, w2, b2), backend="sparsecpu")

    def run_compiled() -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x)

    candidates = {
        "eager dense": lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
        "compiled": run_compiled,
        "linear_chain": lambda: ops.linear_chain(x, [w1, w2], [p1, p2], [b1, b2], ["gelu", "none"]),
        "two linear ops": lambda: ops.linear(ops.linear(x, w1, p1, b1, "gelu"), w2, p2, b2),
    }
    times = check_then_time(candidates, "eager dense", args.threads, args.rounds, args.min_run_time, tolerance=1e-5)

    dense = statistics.median(times["eager dense"])
    zeros = "at random positions" if args.block_rows == 1 else f"in {args.block_rows}x1 blocks"
    print(
        f"FFN {HIDDEN}->{INTERMEDIATE} GELU ->{HIDDEN}, {args.sparsity}% sparse (zeros {zeros}), "
        f"{args.tokens} tokens, {args.threads} threads, medians over {args.rounds} interleaved rounds"
    )
    for name, ms in times.items():
        print(f"  {name:>15}  {statistics.median(ms):8.3f} ms  {dense / statistics.median(ms):6.2f}x")
    for numerator, denominator in (("linear_chain", "two linear ops"), ("compiled", "linear_chain")):
        ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
        print(f"  {numerator} / {denominator}, per round: " + " ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
