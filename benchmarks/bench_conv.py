"""The convolutions of a real CNN, layer by layer: dense ``F.conv2d`` against
``torch_sparsecpu.ops.conv2d`` on the input shape each layer sees.

    python benchmarks/bench_conv.py [--model resnet50|mobilenetv2] [--sparsity 90]
                                    [--threads 2] [--rounds 3] [--image 224]

The model comes from its ``transformers`` config with random weights; every ungrouped
convolution is magnitude-pruned to the sparsity. Distinct (input shape, weight shape,
stride, padding) layers are timed once each, dense and sparse in interleaved rounds in
this process (medians of ``torch.utils.benchmark`` per round, then the median over
rounds), after the sparse result was checked against dense. The table gives each
layer's count in the model, its times, the speed-up and GFLOP/s over nonzeros next to
dense GFLOP/s over all weights; the last line sums over the model's layers.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torch_sparsecpu
from torch_sparsecpu import ops
from torch_sparsecpu.bench.models import build_model, resolve_model

from common import check_then_time

# --model choice: its name in torch_sparsecpu.bench.models
MODELS = {"resnet50": "resnet50", "mobilenetv2": "mobilenet-v2"}


def conv_layers(model_name: str, sparsity: float, image: int) -> list[tuple[nn.Conv2d, tuple[int, ...], int]]:
    """(layer, input shape, how many layers share both) for each distinct ungrouped
    convolution of the model, pruned, in the order the forward runs them."""
    model = build_model(resolve_model(MODELS[model_name]), sparsity=sparsity).module
    seen: dict[tuple, list] = {}

    def record(layer, inputs, _output):
        if layer.groups == 1:
            key = (tuple(inputs[0].shape), tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation)
            seen.setdefault(key, [layer, tuple(inputs[0].shape), 0])[2] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, image, image))
    for hook in hooks:
        hook.remove()
    return [tuple(entry) for entry in seen.values()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--sparsity", type=float, default=90, help="percent of zero weights (default 90)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity < 100:
        parser.error(f"--sparsity must be in [0, 100), got {args.sparsity}")
    for name in ("threads", "rounds", "image"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(0)

    layers = conv_layers(args.model, args.sparsity / 100, args.image)
    print(
        f"{args.model}, {args.image} x {args.image}, {args.sparsity:g}% zeros, {args.threads} threads, "
        f"{args.rounds} interleaved round(s), kernels {torch_sparsecpu.isa()}"
    )
    print(
        f"{'input':>20} {'weight':>20} {'stride':>6} {'pad':>4} {'x':>3} {'dense ms':>9} {'sparse ms':>10} "
        f"{'speed-up':>8} {'sparse GF/s nnz':>16} {'dense GF/s':>11}"
    )
    total_dense = total_sparse = 0.0
    with torch.inference_mode():
        for layer, input_shape, count in layers:
            x = torch.randn(input_shape)
            weight = layer.weight.detach()
            packed = ops.pack_linear(weight.flatten(1))
            geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            times = check_then_time(
                {
                    "dense": functools.partial(F.conv2d, x, weight, None, **geometry),
                    "sparse": functools.partial(ops.conv2d, x, weight, packed, None, **geometry),
                },
                "dense",
                args.threads,
                args.rounds,
                args.min_run_time,
            )
            dense_ms, sparse_ms = (statistics.median(times[name]) for name in ("dense", "sparse"))
            pixels = F.conv2d(x, weight, None, **geometry)[0, 0].numel()  # per image (batch 1)
            flops_nnz = 2 * pixels * int(torch.count_nonzero(weight))
            flops_dense = 2 * pixels * weight.numel()
            total_dense += count * dense_ms
            total_sparse += count * sparse_ms
            print(
                f"{str(list(input_shape)):>20} {str(list(weight.shape)):>20} {layer.stride[0]:>6} "
                f"{layer.padding[0]:>4} {count:>3} {dense_ms:>9.3f} {sparse_ms:>10.3f} {dense_ms / sparse_ms:>7.2f}x "
                f"{flops_nnz / sparse_ms / 1e6:>16.1f} {flops_dense / dense_ms / 1e6:>11.1f}"
            )
    print(
        f"all {sum(c for *_, c in layers)} ungrouped convolutions: dense {total_dense:.1f} ms, "
        f"sparse {total_sparse:.1f} ms, {total_dense / total_sparse:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
