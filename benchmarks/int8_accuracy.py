"""How far ``options={"quantize": "int8"}`` moves a pruned model's output from fp32 eager,
next to PyTorch's own dense dynamic quantization on the same pruned model.

    python benchmarks/int8_accuracy.py [--models ffn,bert-base,resnet50] [--inner eager]

Models (random weights, a fixed seed, nothing downloaded; torch_sparsecpu.bench.models):
- ffn: BERT's FFN block 768 -> 3072 -> GELU -> 768, 128 tokens, both linears pruned to
  90% in 1 x 4 blocks;
- bert-base: Hugging Face BERT-base, its encoder linears pruned to 90% in 1 x 4 blocks,
  one sequence of 128 tokens (output: the last hidden state);
- resnet50: Hugging Face ResNet-50 with its classifier (ResNetForImageClassification),
  every convolution and the classifier's linear (2048 -> 1000) pruned to 90% weight by
  weight, one 224 x 224 image (output: the logits). Both int8 paths quantize linears
  only, so here only the classifier is int8 (one token: ops.int8_pays's GEMV rule).

Paths, each against the same model run eagerly in fp32:
- sparsecpu-int8: ``torch.compile(model, backend="sparsecpu", options={"quantize": "int8",
  "inner": ...})``: the layers ``ops.int8_pays`` for run int8 (weights per output row,
  activations per token, 7-bit), the others fp32;
- quantize_dynamic: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  dtype=torch.qint8)`` on a copy, run eagerly (every nn.Linear int8, per-tensor weights,
  activations per tensor);
- sparsecpu fp32: the backend without quantize, for scale.

Errors: max-abs relative, max |y - y_ref| / max |y_ref| (the correctness contract's
measure, sparsecpu-bench's tolerance for int8 is 5e-2 of it), and mean relative,
mean |y - y_ref| / mean |y_ref|. After the table, a line names every model and measure
where ours is worse than quantize_dynamic's, and by how much (docs/benchmarks.md#int8-accuracy
explains the one case).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.bench.measure import relative_error
from torch_sparsecpu.bench.models import BenchModel, build_model, resolve_model

SPARSITY = 0.9
TOKENS = 128
IMAGENET_CLASSES = 1000  # ResNet-50's classifier: 2048 -> 1000
# model name -> (sparsecpu-bench's model, build_model's block arguments)
MODELS = {
    "ffn": ("mlp", {"block_cols": 4}),
    "bert-base": ("bert-base", {"block_cols": 4}),
    "resnet50": ("resnet50", {}),
}
PATHS = ("sparsecpu-int8", "quantize_dynamic", "sparsecpu fp32")


def mean_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """mean |actual - expected| / mean |expected|."""
    return ((actual.double() - expected.double()).abs().mean() / expected.double().abs().mean()).item()


def build(name: str) -> BenchModel:
    """The pruned model ``name`` of MODELS with one call's inputs. ResNet-50 comes with
    its ImageNet classifier (``ResNetForImageClassification``, 1000 classes:
    sparsecpu-bench's ``ResNetModel`` has no linear at all), pruned like the convolutions."""
    model_name, blocks = MODELS[name]
    spec = resolve_model(model_name)
    if name == "resnet50":
        import transformers

        config = copy.deepcopy(spec.config)
        config.num_labels = IMAGENET_CLASSES  # the config's default is 2: a 2-number output measures nothing
        classifier = transformers.ResNetForImageClassification
        spec = dataclasses.replace(spec, config=config, model_class=classifier, layer_types=(nn.Conv2d, nn.Linear))
    return build_model(spec, sparsity=SPARSITY, seq=TOKENS, **blocks)


def errors(module: nn.Module, inputs: Sequence[torch.Tensor], inner: str = "eager") -> dict[str, tuple[float, float]]:
    """Each path of PATHS: (max-abs relative, mean relative) error of its output against
    ``module``'s in fp32 eager, and "int8 layers": how many linears our path ran int8."""
    output = BenchModel.output
    torch._dynamo.reset()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        quantized_copy = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {nn.Linear}, dtype=torch.qint8)
    runs = {
        "sparsecpu-int8": torch.compile(module, backend="sparsecpu", options={"quantize": "int8", "inner": inner}),
        "quantize_dynamic": quantized_copy,
        "sparsecpu fp32": torch.compile(module, backend="sparsecpu", options={"inner": inner}),
    }
    with torch.inference_mode():
        expected = output(module(*inputs))
        results = {}
        for path, run in runs.items():
            actual = output(run(*inputs))
            results[path] = (relative_error(actual, expected), mean_relative_error(actual, expected))
        decisions = torch_sparsecpu.explain(module, *inputs, quantize="int8")
    results["int8 layers"] = (sum(d.taken and d.datatype == "int8" for d in decisions), len(decisions))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated among {', '.join(MODELS)}")
    parser.add_argument(
        "--inner",
        choices=("eager", "inductor"),
        default="eager",
        help="the backend's inner compiler (the sparse ops are the same; default eager, quick to compile)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {', '.join(unknown)!r}; known: {', '.join(MODELS)}")
    print(
        f"torch {torch.__version__}, sparse kernels {torch_sparsecpu.isa()}, inner {args.inner}; "
        f"error of each path's output against fp32 eager on the same pruned model"
    )
    header = f"{'model':<10} {'int8 linears':>12}" + "".join(f"  {path + ' max / mean':>32}" for path in PATHS)
    print(header)
    worse = []
    for name in names:
        model = build(name)
        result = errors(model.module, model.inputs, args.inner)
        int8_layers, layers = result.pop("int8 layers")
        cells = "".join(f"  {f'{result[p][0]:.3e} / {result[p][1]:.3e}':>32}" for p in PATHS)
        print(f"{name:<10} {f'{int8_layers}/{layers}':>12}{cells}", flush=True)
        ours, theirs = result["sparsecpu-int8"], result["quantize_dynamic"]
        worse += [
            f"{name} {measure} by {ours[i] / theirs[i] - 1:.2%}"
            for i, measure in enumerate(("max", "mean"))
            if ours[i] > theirs[i]
        ]
    print(f"sparsecpu-int8 worse than quantize_dynamic: {', '.join(worse) if worse else 'nowhere'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
