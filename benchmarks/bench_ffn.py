"""BERT's FFN block (768 -> 3072 -> GELU -> 768), or with ``--layers 3`` a 3-layer MLP
(768 -> 3072 GELU -> 3072 ReLU -> 768): the module compiled with ``backend="sparsecpu"``,
one ``linear_chain`` op, the layers as separate ``linear`` calls, and eager dense.

    python benchmarks/bench_ffn.py [--layers 2] [--sparsity 90] [--tokens 128] [--threads 2] [--rounds 7]
                                   [--block-rows 4 | --block-cols 4] [--quantize int8] [--overhead] [--cpu-time]

The four are timed in interleaved rounds (medians of ``torch.utils.benchmark`` each round,
same process, same threads); the table gives the median over rounds, then per round the
chain's time over the separate ops' and the compiled module's over the chain's (what
Dynamo's guards and the wrappers add to the op). Every sparse version is checked against
dense first. The compiled module runs under ``torch.inference_mode`` (the backend fuses
the layers into one chain only with grad mode off).

``--quantize int8`` also times the module compiled with ``options={"quantize": "int8"}``
(checked against dense within common's ``QUANTIZED_TOLERANCE``), next to the fp32 compiled module on
the same weights; ``--block-cols 4`` draws weights whose zeros come in 1 x 4 blocks, the
shape the int8 kernels need to pay on many tokens (``ops.int8_pays``).

``--overhead`` also times the chain and the separate ops with all-zero weights (same
shapes, no multiply-adds): the time outside the multiplies (panel copies, bias,
activations, output writes), which is all that fusing the layers can remove; it prints
the speed-up fusion would reach if it removed that and left the multiplies as fast as in
the separate ops (docs/tile_planner.md#what-fusion-can-save).

``--cpu-time`` times by the CPU time of all the process's threads instead of wall time:
on a machine shared with other jobs, the cost of the work rather than the share of the
cores the scheduler granted (run with ``OMP_WAIT_POLICY=PASSIVE`` so that waiting OpenMP
threads sleep rather than spin).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torch_sparsecpu import ops

from common import (
    QUANTIZED_TOLERANCE,
    add_single_case_arguments,
    check_then_time,
    random_input,
    random_sparse_weight,
)

HIDDEN, INTERMEDIATE = 768, 3072
# Features and activations per --layers: BERT's FFN block, and the 3-layer MLP.
LAYERS = {
    2: ((HIDDEN, INTERMEDIATE, HIDDEN), ("gelu", "none")),
    3: ((HIDDEN, INTERMEDIATE, INTERMEDIATE, HIDDEN), ("gelu", "relu", "none")),
}
WEIGHT_SEEDS = (1, 2, 4)  # the FFN's two weights as before; the input keeps seed 3
ACTIVATION_MODULES = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}
ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "relu": F.relu, "none": lambda t: t}
ACTIVATION_NAMES = {"gelu": "GELU", "relu": "ReLU"}
SEPARATE_OPS = {2: "two linear ops", 3: "three linear ops"}


def compiled_mlp(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], activations: Sequence[str]
) -> torch.nn.Module:
    """The block as a user writes it (Linear, activation module, Linear, ...), holding the
    given weights (not yet compiled)."""
    modules: list[torch.nn.Module] = []
    for weight, bias, activation in zip(weights, biases, activations, strict=True):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        modules.append(linear)
        if activation != "none":
            modules.append(ACTIVATION_MODULES[activation]())
    return torch.nn.Sequential(*modules).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_single_case_arguments(parser, tokens=128, threads=2, rounds=7, min_run_time=0.3)
    parser.add_argument("--layers", type=int, choices=sorted(LAYERS), default=2, help="2: BERT's FFN; 3: the MLP")
    parser.add_argument("--overhead", action="store_true", help="also time both sparse versions with zero weights")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the CPU time of all threads (time.process_time), not wall time; needs OMP_WAIT_POLICY=PASSIVE "
        "with more than one thread",
    )
    parser.add_argument(
        "--block-cols", type=int, choices=(1, 4), default=1, help="4: zeros in 1 x 4 blocks (with --block-rows 1)"
    )
    parser.add_argument(
        "--quantize",
        choices=ops.QUANTIZED_DATATYPES,
        help='also time the module compiled with options={"quantize": "int8"}',
    )
    args = parser.parse_args(argv)
    if args.block_cols > 1 and args.block_rows > 1:
        parser.error("--block-cols 4 needs --block-rows 1 (zeros in 1 x 4 or in 4 x 1 blocks, not both)")
    if args.cpu_time and args.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        parser.error("--cpu-time with --threads > 1 needs OMP_WAIT_POLICY=PASSIVE (spinning threads count as CPU time)")

    features, activations = LAYERS[args.layers]
    weights = [
        random_sparse_weight(
            out_f, in_f, args.sparsity, seed=seed, block_rows=args.block_rows, block_cols=args.block_cols
        )
        for in_f, out_f, seed in zip(features, features[1:], WEIGHT_SEEDS, strict=False)
    ]
    biases = [torch.randn(w.shape[0]) for w in weights]
    packed = [ops.pack_linear(w) for w in weights]
    x = random_input(args.tokens, HIDDEN, seed=3)
    compiled = torch.compile(compiled_mlp(weights, biases, activations), backend="sparsecpu")
    separate = SEPARATE_OPS[args.layers]

    def eager_dense() -> torch.Tensor:
        y = x
        for w, b, activation in zip(weights, biases, activations, strict=True):
            y = ACTIVATION_FUNCTIONS[activation](F.linear(y, w, b))
        return y

    def run_compiled(compiled=compiled) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x)

    def separate_ops(weights=weights, packed=packed) -> torch.Tensor:
        y = x
        for w, p, b, activation in zip(weights, packed, biases, activations, strict=True):
            y = ops.linear(y, w, p, b, activation)
        return y

    candidates = {
        "eager dense": eager_dense,
        "compiled": run_compiled,
        "linear_chain": lambda: ops.linear_chain(x, weights, packed, biases, activations),
        separate: separate_ops,
    }
    if args.quantize:
        compiled_int8 = torch.compile(
            compiled_mlp(weights, biases, activations), backend="sparsecpu", options={"quantize": args.quantize}
        )
        candidates["compiled int8"] = lambda: run_compiled(compiled_int8)
    expected_results = {}
    if args.overhead:
        zero_weights = [torch.zeros_like(w) for w in weights]
        infos = [ops.packed_info(p) for p in packed]  # the same K-blocks and blocks as the real weights
        zeros_packed = [
            ops.pack_linear(z, k_block=i.k_block, block_rows=i.block_rows)
            for z, i in zip(zero_weights, infos, strict=True)
        ]
        candidates["chain, zero weights"] = lambda: ops.linear_chain(x, zero_weights, zeros_packed, biases, activations)
        candidates["ops, zero weights"] = lambda: separate_ops(zero_weights, zeros_packed)
        # With zero weights every token's output is the last layer's activated bias.
        last_output = ACTIVATION_FUNCTIONS[activations[-1]](biases[-1]).expand(args.tokens, -1)
        expected_results = {name: last_output for name in ("chain, zero weights", "ops, zero weights")}
    times = check_then_time(
        candidates,
        "eager dense",
        args.threads,
        args.rounds,
        args.min_run_time,
        tolerance=1e-5,
        expected_results=expected_results,
        clock=time.process_time if args.cpu_time else time.perf_counter,
        tolerances={"compiled int8": QUANTIZED_TOLERANCE},
    )

    dense = statistics.median(times["eager dense"])
    zeros = (
        f"in {args.block_rows}x{args.block_cols} blocks"
        if args.block_rows * args.block_cols > 1
        else "at random positions"
    )
    layers = zip(features[1:], activations, strict=True)
    shape = " ->".join(f"{f} {ACTIVATION_NAMES.get(a, '')}".strip() for f, a in layers)
    print(
        f"{'FFN' if args.layers == 2 else 'MLP'} {HIDDEN}->{shape}, {args.sparsity}% sparse (zeros {zeros}), "
        f"{args.tokens} tokens, {args.threads} threads, medians over {args.rounds} interleaved rounds"
        + (", CPU time of all threads" if args.cpu_time else "")
    )
    for name, ms in times.items():
        print(f"  {name:>19}  {statistics.median(ms):8.3f} ms  {dense / statistics.median(ms):6.2f}x")
    ratios_of = [("linear_chain", separate), ("compiled", "linear_chain")]
    if args.quantize:
        ratios_of.append(("compiled int8", "compiled"))
    for numerator, denominator in ratios_of:
        ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
        print(f"  {numerator} / {denominator}, per round: " + " ".join(f"{r:.2f}" for r in ratios))
    if args.overhead:
        bounds = [
            ops_ms / (ops_ms - (ops_zero - chain_zero))
            for ops_ms, ops_zero, chain_zero in zip(
                times[separate], times["ops, zero weights"], times["chain, zero weights"], strict=True
            )
        ]
        print(
            f"  {separate} / chain if fusion removed only the overhead, per round: "
            + " ".join(f"{b:.2f}" for b in bounds)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
