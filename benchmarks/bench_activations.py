"""Fused activations: accuracy against float64 and cost inside the sparse kernel.

    python benchmarks/bench_activations.py

Accuracy: a one-feature identity weight makes the pre-activation exactly ``x``; over
100,001 evenly spaced ``x`` in [-12, 12] each kernel ISA's result is compared with the
float64 formula, next to PyTorch's own float32 function (``F.gelu`` / ``F.silu``).

Cost: ``ops.linear`` on BERT's 3072x768 intermediate layer at 90% sparsity, 128 tokens,
with each activation against ``"none"``: medians over rounds that interleave the
activations, same process, same threads. The numbers
are quoted in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import torch_sparsecpu
from torch_sparsecpu.kernels import torch_threads

from common import median_ms, random_input, random_sparse_weight

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)

# float64 references and PyTorch's float32 functions, by activation name.
REFERENCES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (lambda x: 0.5 * x * torch.special.erfc(-x / math.sqrt(2)), F.gelu),
    "gelu_tanh": (
        lambda x: x / (1 + torch.exp(-2 * SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
        lambda x: F.gelu(x, approximate="tanh"),
    ),
    "silu": (lambda x: x / (1 + torch.exp(-x)), F.silu),
    "relu": (torch.relu, torch.relu),
}


def accuracy_rows() -> list[str]:
    x = torch.linspace(-12, 12, 100_001).reshape(-1, 1)
    x64 = x.double()
    weight = torch.ones(1, 1)
    packed = torch_sparsecpu.ops.pack_linear(weight)
    scale = x64.abs().clamp(min=1)
    moderate = x64.abs() <= 5
    rows = []
    for isa in torch_sparsecpu.available_isas():
        with torch_sparsecpu.force_isa(isa):
            for activation, (reference_fn, torch_fn) in REFERENCES.items():
                reference = reference_fn(x64)
                error = (torch_sparsecpu.ops.linear(x, weight, packed, None, activation).double() - reference).abs()
                torch_error = (torch_fn(x).double() - reference).abs()
                relative = error[moderate] / reference[moderate].abs().clamp(min=1e-30)
                rows.append(
                    f"{isa:>7} {activation:>10}  {(error / scale).max():10.2g}  "
                    f"{(torch_error / scale).max():10.2g}  {relative.max():12.2g}"
                )
    return rows


def cost_rows(threads: int, min_run_time: float, rounds: int) -> list[str]:
    out_features, in_features, tokens = 3072, 768, 128
    weight = random_sparse_weight(out_features, in_features, 90, seed=0)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(1))
    x = random_input(tokens, in_features, seed=2)
    packed = torch_sparsecpu.ops.pack_linear(weight)
    pre_activation = F.linear(x, weight, bias)
    activations = ("none", *REFERENCES)
    for activation in activations:
        reference = pre_activation if activation == "none" else REFERENCES[activation][1](pre_activation)
        error = (torch_sparsecpu.ops.linear(x, weight, packed, bias, activation) - reference).abs().max().item()
        if not error <= 1e-5 * pre_activation.abs().max().item():
            sys.exit(f"error: {activation}: wrong result (max error {error:.3g}), no timings reported")
    # Rounds interleave the activations, so a slow spell of the machine hits them all.
    times: dict[str, list[float]] = {activation: [] for activation in activations}
    with torch_threads(threads):
        for _ in range(rounds):
            for activation in activations:
                times[activation].append(
                    median_ms(
                        functools.partial(torch_sparsecpu.ops.linear, x, weight, packed, bias, activation),
                        threads,
                        min_run_time,
                    )
                )
    baseline = statistics.median(times["none"])
    return [
        f"{activation:>10}  {statistics.median(ms):8.3f}  {statistics.median(ms) - baseline:+8.3f}"
        for activation, ms in times.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    args = parser.parse_args(argv)

    print("accuracy over x in [-12, 12] (identity weight), against float64:")
    print(f"{'isa':>7} {'activation':>10}  {'abs/max(|x|,1)':>10}  {'torch F.*':>10}  {'rel, |x|<=5':>12}")
    print("\n".join(accuracy_rows()))
    print(
        f"\ncost in ops.linear, 3072x768 at 90%, 128 tokens, {args.threads} threads (kernels {torch_sparsecpu.isa()}):"
    )
    print(f"{'activation':>10}  {'ms':>8}  {'vs none':>8}")
    print("\n".join(cost_rows(args.threads, args.min_run_time, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
