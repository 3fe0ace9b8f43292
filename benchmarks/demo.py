"""`make demo`: prune real model definitions, compile them with backend="sparsecpu",
check the outputs against eager PyTorch, then time both in this process: eager and
compiled alternate over ROUNDS rounds and the medians over rounds are printed, so a
change of the machine's speed between two measurements moves both.

Every speed-up printed is measured after its output was checked: a wrong answer
stops the demo with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch
from torch import nn
from torch.utils import benchmark

import torch_sparsecpu

ROUNDS = 3


def median_ms(fn, *args, threads: int) -> float:
    timer = benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=0.4).median * 1e3


def interleaved_medians_ms(eager, compiled, *args, threads: int) -> tuple[float, float]:
    """Medians over ROUNDS rounds, each timing eager then compiled."""
    rounds = [
        (median_ms(eager, *args, threads=threads), median_ms(compiled, *args, threads=threads)) for _ in range(ROUNDS)
    ]
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def ffn_block(sparsity: float, block_rows: int = 1):
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity, block_rows=block_rows)
    return model, (torch.randn(128, 768),), 1e-5


def ffn_block_4x1(sparsity: float):
    """The same block pruned in 4 x 1 blocks, which the backend packs in blocks."""
    return ffn_block(sparsity, block_rows=4)


def bert_base(sparsity: float, tokens: int = 128):
    import transformers

    model = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity, name_filter=lambda n: n.startswith("encoder."))
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens))

    def last_hidden_state(module):
        return lambda ids: module(ids).last_hidden_state

    return model, (input_ids,), 1e-4, last_hidden_state


def hf_vision_model(name: str, sparsity: float):
    """A transformers vision model built from its default config (ResNet-50,
    MobileNetV2-1.0), every convolution pruned, one 224 x 224 image."""
    import transformers

    builders = {
        "resnet": (transformers.ResNetModel, transformers.ResNetConfig),
        "mobilenet": (transformers.MobileNetV2Model, transformers.MobileNetV2Config),
    }
    model_class, config_class = builders[name]
    model = model_class(config_class()).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity, layer_types=(nn.Conv2d,))

    def last_hidden_state(module):
        return lambda image: module(image).last_hidden_state

    return model, (torch.randn(1, 3, 224, 224),), 1e-4, last_hidden_state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--bert-tokens", type=int, default=128, help="sequence length of the BERT input (1: batch-1 decoding-like GEMV)"
    )
    args = parser.parse_args()
    if not 1 <= args.bert_tokens <= 512:  # BERT-base has 512 positions
        parser.error(f"--bert-tokens must be in [1, 512], got {args.bert_tokens}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, sparse kernels: {torch_sparsecpu.isa()}, "
        f"{args.threads} threads, weights pruned to {args.sparsity:.0%}\n"
    )

    cases = {
        "FFN 768->3072 GELU ->768, 128 tokens": ffn_block,
        "same FFN pruned in 4x1 blocks": ffn_block_4x1,
        f"HF BERT-base encoder, 1 x {args.bert_tokens} tokens": functools.partial(bert_base, tokens=args.bert_tokens),
        "HF ResNet-50, 1 x 224 x 224": functools.partial(hf_vision_model, "resnet"),
        "HF MobileNetV2, 1 x 224 x 224": functools.partial(hf_vision_model, "mobilenet"),
    }
    rows = []
    for name, build in cases.items():
        model, inputs, tolerance, *wrap = build(args.sparsity)
        wrap = wrap[0] if wrap else (lambda module: module)
        eager = wrap(model)
        compiled = wrap(torch.compile(model, backend="sparsecpu"))
        with torch.inference_mode():
            decisions = torch_sparsecpu.explain(model, *inputs)
            expected = eager(*inputs)
            print(f"{name}: compiling...", flush=True)
            actual = compiled(*inputs)
            error = relative_error(actual, expected)
            taken = sum(d.taken for d in decisions)
            blocked = sum(d.taken and d.block_rows > 1 for d in decisions)
            ok = error <= tolerance
            kinds = " and ".join(sorted({f"{d.kind}s" for d in decisions}))
            print(
                f"  {taken}/{len(decisions)} {kinds} sparse ({blocked} in 4x1 blocks); "
                f"max error {error:.2e} relative "
                f"(tolerance {tolerance:g}): {'OK' if ok else 'MISMATCH'}"
            )
            if not ok:
                return 1
            eager_ms, sparse_ms = interleaved_medians_ms(eager, compiled, *inputs, threads=args.threads)
        rows.append((name, eager_ms, sparse_ms))

    print(f"\nmedians over {ROUNDS} interleaved rounds")
    print(f"{'model':<40} {'eager dense ms':>15} {'sparsecpu ms':>13} {'speed-up':>9}")
    for name, eager_ms, sparse_ms in rows:
        print(f"{name:<40} {eager_ms:>15.2f} {sparse_ms:>13.2f} {eager_ms / sparse_ms:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
