"""`make demo`: prune real model definitions, compile them with backend="sparsecpu",
check the outputs against eager PyTorch, then time both in this process: eager and
compiled alternate over ROUNDS rounds and the medians over rounds are printed, so a
change of the machine's speed between two measurements moves both.

Every speed-up printed is measured after its output was checked: a wrong answer
stops the demo with a non-zero exit code.

``--quantize int8`` adds a column, each model compiled with options={"quantize": "int8"}
as well (checked against eager within sparsecpu-bench's INT8_TOLERANCE first, then timed
in the same rounds), and rows for the FFN and BERT-base pruned in 1x4 blocks, the int8
kernels' shape. Without it the demo runs what it always ran.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

import torch_sparsecpu
from torch_sparsecpu.bench.cli import INT8_TOLERANCE
from torch_sparsecpu.bench.measure import interleaved_rounds, relative_error
from torch_sparsecpu.bench.models import build_model, resolve_model

from common import median_ms

ROUNDS = 3
MIN_RUN_TIME = 0.4  # seconds per blocked_autorange measurement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--bert-tokens", type=int, default=128, help="sequence length of the BERT input (1: batch-1 decoding-like GEMV)"
    )
    parser.add_argument(
        "--quantize",
        choices=torch_sparsecpu.ops.QUANTIZED_DATATYPES,
        help="also time each model compiled with this quantize option",
    )
    args = parser.parse_args()
    if not 1 <= args.bert_tokens <= 512:  # BERT-base has 512 positions
        parser.error(f"--bert-tokens must be in [1, 512], got {args.bert_tokens}")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, sparse kernels: {torch_sparsecpu.isa()}, "
        f"{args.threads} threads, weights pruned to {args.sparsity:.0%}\n"
    )

    # title: (a model of torch_sparsecpu.bench.models, arguments of its build_model)
    cases = {
        "FFN 768->3072 GELU ->768, 128 tokens": ("mlp", {"seq": 128}),
        "same FFN pruned in 4x1 blocks": ("mlp", {"seq": 128, "block_rows": 4}),
        f"HF BERT-base encoder, 1 x {args.bert_tokens} tokens": ("bert-base", {"seq": args.bert_tokens}),
        "HF ResNet-50, 1 x 224 x 224": ("resnet50", {}),
        "HF MobileNetV2, 1 x 224 x 224": ("mobilenet-v2", {}),
    }
    if args.quantize:
        cases["same FFN pruned in 1x4 blocks"] = ("mlp", {"seq": 128, "block_cols": 4})
        cases[f"HF BERT-base, {args.bert_tokens} tokens, 1x4 blocks"] = (
            "bert-base",
            {"seq": args.bert_tokens, "block_cols": 4},
        )
    rows = []
    for name, (model_name, build_arguments) in cases.items():
        # Each case on its own: instances of one class (the FFN cases' nn.Sequential) would
        # share Dynamo's graph, whose build chose each layer's packing from the first
        # instance's weights (README's known issues).
        torch._dynamo.reset()
        model = build_model(resolve_model(model_name), sparsity=args.sparsity, **build_arguments)
        compiled = {"compiled": torch.compile(model.module, backend="sparsecpu")}
        if args.quantize:
            compiled[args.quantize] = torch.compile(
                model.module, backend="sparsecpu", options={"quantize": args.quantize}
            )
        calls = {"eager": functools.partial(model.module, *model.inputs)}
        calls.update({path: functools.partial(fn, *model.inputs) for path, fn in compiled.items()})
        with torch.inference_mode():
            decisions = torch_sparsecpu.explain(model.module, *model.inputs)
            expected = model.output(calls["eager"]())
            print(f"{name}: compiling...", flush=True)
            taken = sum(d.taken for d in decisions)
            blocked = sum(d.taken and d.block_rows > 1 for d in decisions)
            kinds = " and ".join(sorted({f"{d.kind}s" for d in decisions}))
            for path in compiled:
                tolerance = model.spec.tolerance if path == "compiled" else INT8_TOLERANCE
                error = relative_error(model.output(calls[path]()), expected)
                ok = error <= tolerance
                if path == "compiled":
                    what = f"{taken}/{len(decisions)} {kinds} sparse ({blocked} in 4x1 blocks)"
                else:
                    quantized = torch_sparsecpu.explain(model.module, *model.inputs, quantize=path)
                    what = f"{path}: {sum(d.taken and d.datatype == path for d in quantized)} of them {path}"
                print(
                    f"  {what}; max error {error:.2e} relative (tolerance {tolerance:g}): {'OK' if ok else 'MISMATCH'}"
                )
                if not ok:
                    return 1
            times = interleaved_rounds(calls, ROUNDS, lambda fn: median_ms(fn, args.threads, MIN_RUN_TIME))
        rows.append((name, *(statistics.median(times[path]) for path in calls)))

    print(f"\nmedians over {ROUNDS} interleaved rounds")
    quantized_header = f" {args.quantize + ' ms':>9} {'speed-up':>9} {'vs fp32':>8}" if args.quantize else ""
    print(f"{'model':<40} {'eager dense ms':>15} {'sparsecpu ms':>13} {'speed-up':>9}{quantized_header}")
    for name, eager_ms, sparse_ms, *quantized_ms in rows:
        line = f"{name:<40} {eager_ms:>15.2f} {sparse_ms:>13.2f} {eager_ms / sparse_ms:>8.2f}x"
        for ms in quantized_ms:
            line += f" {ms:>9.2f} {eager_ms / ms:>8.2f}x {sparse_ms / ms:>7.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
