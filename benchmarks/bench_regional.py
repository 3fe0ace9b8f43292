"""Regional compilation: blocks compiled one by one, as the PyTorch and Hugging Face
docs recommend for transformer stacks (``for layer in model.layers: layer.compile()``).
Dynamo then runs one graph for every instance of the block's class, so each instance
must keep its own packed weights (csrc/ops/packed_weights.h) or every call repacks.

(a) Two instances of one block (768 -> 3072 GELU -> 768 + residual, 90%), each compiled
    on its own, called alternately, against one instance called alone: time per call.
    Two blocks of distinct classes (one graph each, nothing shared) alternating show
    what alternating costs by itself: twice the packed weights pass through the caches.
(b) HF BERT-base (random init, encoder linears at 90%, 128 tokens) compiled layer by
    layer against compiled whole, eager dense for scale: time per call.

Every path is checked against eager before it is timed; rounds interleave the paths
and the medians over rounds are printed.

    .venv/bin/python benchmarks/bench_regional.py [--threads 2] [--rounds 5] [--skip-bert]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.bench.models import build_model, resolve_model

from common import check_then_time


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(768, 3072), nn.Linear(3072, 768)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


def report(title: str, times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(title)
    for name, ms in medians.items():
        print(f"  {name:<34} {ms:9.3f} ms   {ms / medians[baseline]:5.2f}x of {baseline}")
    return medians


def two_blocks(threads: int, rounds: int, min_run_time: float) -> None:
    torch.manual_seed(0)
    blocks = [torch_sparsecpu.magnitude_prune_(Block().eval(), 0.9) for _ in range(2)]
    distinct = [copy.deepcopy(block) for block in blocks]
    for index, block in enumerate(distinct):  # a class of its own: Dynamo guards on the type, one graph each
        block.__class__ = type(f"DistinctBlock{index}", (Block,), {})
    for block in blocks + distinct:
        block.compile(backend="sparsecpu")
    x = torch.randn(8, 768)
    eager = copy.deepcopy(blocks[0])  # an uncompiled copy: .forward of a compiled module runs eagerly too

    def one_block():
        return blocks[0](x)

    def alternating():  # one call of each instance: the time per call is half of it
        blocks[1](x)
        return blocks[0](x)

    def alternating_distinct():
        distinct[1](x)
        return distinct[0](x)

    with torch.inference_mode():
        for block in blocks + distinct:
            torch.testing.assert_close(block(x), block.forward(x), rtol=1e-5, atol=1e-5)
        times = check_then_time(
            {
                "eager dense (one block)": lambda: eager(x),
                "one block compiled": one_block,
                "shared": alternating,
                "distinct": alternating_distinct,
            },
            "eager dense (one block)",
            threads,
            rounds,
            min_run_time,
        )
    times["two blocks alternating, per call"] = [t / 2 for t in times.pop("shared")]
    times["two distinct classes alternating"] = [t / 2 for t in times.pop("distinct")]
    medians = report(
        f"(a) two 768-3072-768 blocks at 90%, compiled one by one, x [8, 768], {threads} threads",
        times,
        "one block compiled",
    )
    ratio = medians["two blocks alternating, per call"] / medians["one block compiled"]
    print(
        f"  alternating / one block: {ratio:.2f}x (bar: 1.3x); "
        f"alternating / distinct classes alternating: "
        f"{medians['two blocks alternating, per call'] / medians['two distinct classes alternating']:.2f}x"
    )


def bert_layer_by_layer(threads: int, rounds: int, min_run_time: float) -> None:
    model = build_model(resolve_model("bert-base"), sparsity=0.9).module
    layered = copy.deepcopy(model)
    for layer in layered.encoder.layer:
        layer.compile(backend="sparsecpu")
    whole = torch.compile(model, backend="sparsecpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    with torch.inference_mode():
        times = check_then_time(
            {
                "eager dense": lambda: model(ids).last_hidden_state,
                "compiled whole": lambda: whole(ids).last_hidden_state,
                "compiled layer by layer": lambda: layered(ids).last_hidden_state,
            },
            "eager dense",
            threads,
            rounds,
            min_run_time,
            tolerance=1e-4,
        )
    medians = report(
        f"(b) HF BERT-base, encoder linears at 90%, 128 tokens, {threads} threads", times, "compiled whole"
    )
    ratio = medians["compiled layer by layer"] / medians["compiled whole"]
    print(f"  layer by layer / whole: {ratio:.2f}x (bar: 1.2x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-threads", type=int, default=1, help="threads of (a), 1 as in the issue")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--skip-bert", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, kernels {torch_sparsecpu.isa()}")
    two_blocks(args.block_threads, args.rounds, args.min_run_time)
    if not args.skip_bert:
        bert_layer_by_layer(args.threads, args.rounds, args.min_run_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
