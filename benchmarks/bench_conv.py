"""Sparse convolutions of a real CNN: layer by layer, bottleneck by bottleneck, or the
whole model.

    python benchmarks/bench_conv.py [--mode layers|blocks|model|chains|forward] [--model resnet50|mobilenetv2]
                                    [--sparsity 90] [--threads 2] [--rounds 3] [--image 224]
                                    [--block stages.0.layers.1]

The model comes from its ``transformers`` config with random weights. Every mode checks
each path's output against the reference before timing, then times the paths in
interleaved rounds in this process (medians of ``torch.utils.benchmark`` per round, then
the median over rounds), so a slow spell of a shared machine hits every path alike.

- ``layers`` (every ungrouped convolution magnitude-pruned to the sparsity): dense
  ``F.conv2d`` against ``torch_sparsecpu.ops.conv2d`` on the input shape each distinct
  layer sees, with GFLOP/s over nonzeros next to dense GFLOP/s over all weights; the last
  line sums over the model's layers.
- ``blocks`` (convolutions pruned): each distinct block compiled alone on the input it
  sees, eager against ``backend="sparsecpu"`` with ``fuse_layers=False`` and fused (one
  ``sparsecpu::conv_chain`` call per block). ResNet-50: the first and second bottleneck
  of each stage (unfused: three or four ``sparsecpu::conv2d`` calls and Inductor's add +
  ReLU). MobileNetV2: the first inverted residual at each resolution and the one after it
  (unfused: two ``sparsecpu::conv2d`` calls around oneDNN's depthwise convolution, HF's
  pads, Inductor's batch norm + ReLU6 and the residual add). ``--block`` names others
  (``stages.0.layers.1`` under ResNet's encoder, ``layer.3`` for MobileNetV2). With
  ``--floor`` each block is also timed unfused and fused with its convolutions at 99.9%
  zeros (the time outside the multiplies), and one pass that reads the block's input and writes its
  output (half the time of cloning both: the traffic no fusion avoids). Printed with
  them: ``unfused / (unfused - floor)``, the most fusing could gain if it spent nothing
  but the multiplies, and ``unfused / (unfused - floor + pass)``, if it also reads the
  input and writes the output once.
- ``model``: the whole model at batch 1, eager (dense kernels on the pruned weights)
  against sparsecpu fused and with ``fuse_layers=False``; outputs within 1e-4 of eager.
  ResNet-50: every convolution but the stem pruned; MobileNetV2: every convolution
  (``sparsecpu-bench``'s recipe; its depthwise ones run dense either way). With
  ``--floor`` also the fused model with its convolutions at 99.9% zeros: the forward's
  time outside the sparse multiplies, and so what the multiplies take, with their rate
  (GFLOP/s over the nonzeros the 99.9% model lacks) next to eager's over its dense
  convolutions.
- ``chains``: each ``sparsecpu::conv_chain`` call of the fused model's forward (as
  ``model`` prunes it), recorded and called again as it was, under the tile planner's
  choice, with ``split_channels=False`` (bands, one thread each) and with
  ``split_channels=True`` (a team per image); each checked against the planner's result
  before timing.
- ``forward``: where the fused model's forward goes (checked against eager first): each
  forward's wall time cut at the entry and exit of its ``conv_chain`` calls, into the
  time before the first (Dynamo's guards, Inductor's wrapper, the dense stem and its
  pooling), in the calls, between them and after the last; and each call's time inside
  the forward next to the same call run alone right after (warm: what ``chains`` times
  under the planner). Medians over ``--rounds`` x 50 forwards (each piece's own median:
  they need not add up).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torch_sparsecpu
from torch_sparsecpu import ops
from torch_sparsecpu.bench.measure import relative_error
from torch_sparsecpu.bench.models import BenchModel, build_model, resolve_model
from torch_sparsecpu.kernels import torch_threads

from common import check_then_time, median_ms

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


def conv_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one forward of ``model`` on ``x`` in its convolutions: over the nonzero
    weights of the ungrouped ones (what the sparse kernels multiply) and over every weight
    of all of them (what dense kernels do)."""
    totals = [0, 0]

    def count(layer, _inputs, output):
        pixels = output[0, 0].numel() * output.shape[0]
        if layer.groups == 1:
            totals[0] += 2 * pixels * int(torch.count_nonzero(layer.weight))
        totals[1] += 2 * pixels * layer.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return totals[0], totals[1]


def hf_resnet50(sparsity: float, prune_stem: bool) -> nn.Module:
    """HF ResNetModel with ResNet-50's config, random weights (seed 0), convolutions
    magnitude-pruned to ``sparsity`` (the stem's too with ``prune_stem``)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ResNetModel(transformers.ResNetConfig()).eval()
    keep_stem = None if prune_stem else (lambda name: not name.startswith("embedder"))
    return torch_sparsecpu.magnitude_prune_(model, sparsity, layer_types=(nn.Conv2d,), name_filter=keep_stem)


def hf_mobilenet_v2(sparsity: float) -> nn.Module:
    """HF MobileNetV2Model with the MobileNetV2-1.0 config, random weights (seed 0), every
    convolution magnitude-pruned to ``sparsity`` (sparsecpu-bench's mobilenet-v2)."""
    return build_model(resolve_model(MODELS["mobilenetv2"]), sparsity=sparsity).module


# Blocks mode: the model, where its blocks are, and the blocks timed by default.
BLOCKS = {
    "resnet50": (
        functools.partial(hf_resnet50, prune_stem=True),
        lambda model: model.encoder,
        [f"stages.{s}.layers.{i}" for s in range(4) for i in (0, 1)],
    ),
    "mobilenetv2": (
        hf_mobilenet_v2,
        lambda model: model,
        [f"layer.{i}" for i in (0, 1, 2, 3, 5, 6, 9, 12, 13)],
    ),
}


def block_inputs(model: nn.Module, root: nn.Module, names: Sequence[str], image: int) -> dict[str, torch.Tensor]:
    """The input each named block under ``root`` sees on one random image (a forward hook)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, inputs, _output):  # returns None: the output stays as it is
            seen.setdefault(name, inputs[0].detach().clone())

        return hook

    hooks = [root.get_submodule(name).register_forward_hook(record(name)) for name in names]
    with torch.no_grad():
        model(torch.randn(1, 3, image, image))
    for hook in hooks:
        hook.remove()
    return seen


def op_calls(fn) -> int:
    """How many sparsecpu ops one call of ``fn`` runs (after a first call, which may compile)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("sparsecpu::") and e.name != "sparsecpu::pack_linear")


def time_paths(paths: dict, args, tolerance: float, expected_results=None) -> dict[str, float]:
    """Checks every path against paths["eager"] (or its entry of ``expected_results``),
    then the medians over interleaved rounds."""
    times = check_then_time(
        paths, "eager", args.threads, args.rounds, args.min_run_time, tolerance, expected_results=expected_results
    )
    return {name: statistics.median(samples) for name, samples in times.items()}


def compiled_paths(module: nn.Module, x: torch.Tensor) -> dict:
    """eager, sparsecpu with fuse_layers=False and sparsecpu (fused), each called on x."""
    unfused = torch.compile(module, backend="sparsecpu", options={"fuse_layers": False})
    fused = torch.compile(module, backend="sparsecpu")
    output = BenchModel.output
    return {
        "eager": lambda: output(module(x)),
        "unfused": lambda: output(unfused(x)),
        "fused": lambda: output(fused(x)),
    }


def run_blocks(args) -> None:
    make_model, root_of, default_names = BLOCKS[args.model]
    model = make_model(args.sparsity / 100)
    root = root_of(model)
    names = args.block or default_names
    inputs = block_inputs(model, root, names, args.image)
    print(
        f"{args.model} blocks compiled alone, {args.sparsity:g}% zeros, {args.threads} threads, "
        f"{args.rounds} interleaved round(s), kernels {torch_sparsecpu.isa()}"
    )
    header = ("block", 20), ("input", 18), ("eager ms", 9), ("unfused ms", 11), ("fused ms", 9), ("ops", 7)
    floor_header = " unfused 99.9% ms  fused 99.9% ms  in+out pass ms  bound  bound with pass" if args.floor else ""
    print(" ".join(f"{title:>{width}}" for title, width in header), "fused/unfused" + floor_header)
    with torch.inference_mode():
        for name in names:
            torch._dynamo.reset()  # the blocks share their class's forward: Dynamo's recompile limit is per code
            block, x = root.get_submodule(name), inputs[name]
            paths, expected = compiled_paths(block, x), {}
            if args.floor:
                # The same block with almost no multiply left: what its unfused path spends
                # outside the multiplies, which is all that fusing its layers can save.
                floor_block = torch_sparsecpu.magnitude_prune_(copy.deepcopy(block), 0.999, layer_types=(nn.Conv2d,))
                floor_paths = compiled_paths(floor_block, x)
                paths["floor"], expected["floor"] = floor_paths["unfused"], floor_paths["eager"]()
                paths["fused floor"], expected["fused floor"] = floor_paths["fused"], expected["floor"]
                # Reading the input and writing the output once, which fusing cannot avoid:
                # half of cloning both (the result checked is the input's clone).
                y = floor_paths["eager"]()
                paths["pass"], expected["pass"] = (lambda x=x, y=y: (y.clone(), x.clone())[1]), x
            ms = time_paths(paths, args, tolerance=1e-5, expected_results=expected)
            ops_used = f"{op_calls(paths['unfused'])}->{op_calls(paths['fused'])}"
            floor = ""
            if args.floor:  # fused can be no faster than the multiplies alone: unfused - floor
                multiplies, in_out = ms["unfused"] - ms["floor"], ms["pass"] / 2
                floor = (
                    f" {ms['floor']:>16.3f} {ms['fused floor']:>14.3f} {in_out:>14.3f}"
                    f" {ms['unfused'] / multiplies:>5.2f}x {ms['unfused'] / (multiplies + in_out):>15.2f}x"
                )
            print(
                f"{name:>20} {str(list(x.shape)):>18} {ms['eager']:>9.3f} {ms['unfused']:>11.3f} "
                f"{ms['fused']:>9.3f} {ops_used:>7} {ms['unfused'] / ms['fused']:>13.2f}x{floor}"
            )


def pruned_model(args, sparsity: float) -> tuple[nn.Module, str]:
    """The model with its convolutions (ResNet-50's but the stem) pruned to ``sparsity``."""
    if args.model == "resnet50":
        return hf_resnet50(sparsity, prune_stem=False), "every convolution but the stem"
    return hf_mobilenet_v2(sparsity), "every convolution"


def model_and_input(args, what: str) -> tuple[nn.Module, torch.Tensor]:
    """The pruned model and a batch-1 input, after a header line saying what is timed."""
    model, pruned = pruned_model(args, args.sparsity / 100)
    print(
        f"HF {args.model}{what}, batch 1, {args.image} x {args.image}, {pruned} {args.sparsity:g}% zeros, "
        f"{args.threads} threads, {args.rounds} interleaved round(s), kernels {torch_sparsecpu.isa()}"
    )
    return model, torch.randn(1, 3, args.image, args.image)


def run_model(args) -> None:
    model, x = model_and_input(args, "")
    with torch.inference_mode():
        paths, expected = compiled_paths(model, x), {}
        if args.floor:
            # The same model with almost no multiply left, fused: the forward's time
            # outside the sparse multiplies (stem, copies, writes, Dynamo, Inductor).
            floor_model, _ = pruned_model(args, 0.999)
            floor_paths = compiled_paths(floor_model, x)
            paths["fused 99.9%"], expected["fused 99.9%"] = floor_paths["fused"], floor_paths["eager"]()
            (sparse_flops, dense_flops), (floor_flops, _) = conv_flops(model, x), conv_flops(floor_model, x)
        ms = time_paths(paths, args, tolerance=1e-4, expected_results=expected)
    for name in ("eager", "unfused", "fused"):
        print(f"{name:>8} {ms[name]:>9.2f} ms  {ms['eager'] / ms[name]:>5.2f}x vs eager")
    if args.floor:
        multiplies = ms["fused"] - ms["fused 99.9%"]
        print(
            f"fused with 99.9% zeros {ms['fused 99.9%']:.2f} ms (all but the multiplies): "
            f"the multiplies take {multiplies:.2f} ms ({multiplies / ms['fused']:.0%} of fused)"
        )
        # The nonzeros the 99.9% model lacks, in the multiplies' time; eager's convolutions
        # over every weight in eager's whole forward (so a lower bound on their rate).
        dense_rate = dense_flops / (ms["eager"] * 1e6) / args.threads
        sparse_rate = (
            f"multiplies {(sparse_flops - floor_flops) / (multiplies * 1e6) / args.threads:.1f} "
            "GFLOP/s over nonzeros per thread"
            if multiplies > 0
            else "multiplies: no time left to rate"
        )
        print(f"{sparse_rate}; eager {dense_rate:.1f} GFLOP/s per thread (its convolutions, dense)")


@contextlib.contextmanager
def conv_chain_replaced(stand_in_for):
    """sparsecpu::conv_chain calls made inside go to ``stand_in_for(op)``. Inductor's
    wrapper looks the op up as ``torch.ops.sparsecpu.conv_chain.default`` at each call,
    so a stand-in there sees them (a TorchDispatchMode would make Dynamo run the model
    eagerly instead)."""
    packet = torch.ops.sparsecpu.conv_chain
    op = packet.default
    packet.default = stand_in_for(op)
    try:
        yield
    finally:
        packet.default = op


@contextlib.contextmanager
def recorded_chain_calls():
    """Yields a list of the (args, kwargs) of every sparsecpu::conv_chain call made inside."""
    calls = []

    def recording(op):
        def record(*args, **kwargs):
            calls.append((args, kwargs))
            return op(*args, **kwargs)

        return record

    with conv_chain_replaced(recording):
        yield calls


def run_chains(args) -> None:
    model, x = model_and_input(args, "'s conv_chain calls")
    print(f"{'call':>4} {'input':>20} {'planner ms':>11} {'bands ms':>9} {'team ms':>8}")
    totals = dict.fromkeys(("planner", "bands", "team"), 0.0)
    with torch.inference_mode(), torch_threads(args.threads):
        fused = torch.compile(model, backend="sparsecpu")
        fused(x)
        with recorded_chain_calls() as calls:
            fused(x)
    with torch.inference_mode():
        for i, (op_args, op_kwargs) in enumerate(calls):
            op = torch.ops.sparsecpu.conv_chain.default
            paths = {
                name: functools.partial(op, *op_args, **op_kwargs, **choice)
                for name, choice in (
                    ("planner", {}),
                    ("bands", {"split_channels": False}),
                    ("team", {"split_channels": True}),
                )
            }
            times = check_then_time(paths, "planner", args.threads, args.rounds, args.min_run_time)
            ms = {name: statistics.median(samples) for name, samples in times.items()}
            for name in totals:
                totals[name] += ms[name]
            print(
                f"{i:>4} {str(list(op_args[0].shape)):>20} {ms['planner']:>11.3f} {ms['bands']:>9.3f} "
                f"{ms['team']:>8.3f}"
            )
    print(f"{'all':>4} {'':>20} {totals['planner']:>11.3f} {totals['bands']:>9.3f} {totals['team']:>8.3f}")


FORWARDS_PER_ROUND = 50


def run_forward(args) -> None:
    model, x = model_and_input(args, "'s forward, piece by piece")
    stamps: list[float] = []  # perf_counter at each conv_chain call's entry and exit

    def stamping(op):
        def stamp(*op_args, **op_kwargs):
            stamps.append(time.perf_counter())
            y = op(*op_args, **op_kwargs)
            stamps.append(time.perf_counter())
            return y

        return stamp

    pieces: dict[str, list[float]] = {
        name: [] for name in ("forward", "before the first chain", "in the chains", "between chains", "after the last")
    }
    with torch.inference_mode(), torch_threads(args.threads):
        fused = torch.compile(model, backend="sparsecpu")
        error = relative_error(BenchModel.output(fused(x)), BenchModel.output(model(x)))
        if not error <= 1e-4:
            sys.exit(f"error: fused: wrong result (max error {error:.3g} relative), no timings reported")
        with recorded_chain_calls() as calls:
            fused(x)
        if not calls:
            sys.exit("error: the fused forward makes no sparsecpu::conv_chain call (nothing sparse to fuse?)")
        per_call: list[list[float]] = [[] for _ in calls]
        with conv_chain_replaced(stamping):
            for _ in range(args.rounds * FORWARDS_PER_ROUND):
                stamps.clear()
                start = time.perf_counter()
                fused(x)
                end = time.perf_counter()
                entries, exits = stamps[0::2], stamps[1::2]
                for i, (entry, exit_) in enumerate(zip(entries, exits, strict=True)):
                    per_call[i].append(exit_ - entry)
                for name, seconds in (
                    ("forward", end - start),
                    ("before the first chain", entries[0] - start),
                    ("in the chains", sum(b - a for a, b in zip(entries, exits, strict=True))),
                    ("between chains", sum(b - a for a, b in zip(exits[:-1], entries[1:], strict=True))),
                    ("after the last", end - exits[-1]),
                ):
                    pieces[name].append(seconds)
        op = torch.ops.sparsecpu.conv_chain.default
        alone = [median_ms(functools.partial(op, *a, **k), args.threads, args.min_run_time) for a, k in calls]
    for name, seconds in pieces.items():
        print(f"{name:>22} {statistics.median(seconds) * 1e3:>8.3f} ms")
    print(f"{'call':>4} {'input':>20} {'ms in the forward':>18} {'ms alone':>9}")
    in_forward = [statistics.median(seconds) * 1e3 for seconds in per_call]
    for i, ((op_args, _), ms, alone_ms) in enumerate(zip(calls, in_forward, alone, strict=True)):
        print(f"{i:>4} {str(list(op_args[0].shape)):>20} {ms:>18.3f} {alone_ms:>9.3f}")
    print(f"{'all':>4} {'':>20} {sum(in_forward):>18.3f} {sum(alone):>9.3f}")


def run_layers(args) -> None:
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


# --mode: what each runs (the module docstring says what each times).
MODES = {"layers": run_layers, "blocks": run_blocks, "model": run_model, "chains": run_chains, "forward": run_forward}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=tuple(MODES), default="layers")
    parser.add_argument("--block", action="append", help="blocks mode: a block (ResNet: under encoder; repeatable)")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--sparsity", type=float, default=90, help="percent of zero weights (default 90)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="blocks mode: also time each block with 99.9%% zeros, and the most fusing could gain; "
        "model mode: also the fused model with 99.9%% zeros (the time outside the multiplies)",
    )
    parser.add_argument(
        "--dict-tag-guards",
        action="store_true",
        help="compile with torch._dynamo.config.use_recursive_dict_tags_for_guards = True: Dynamo "
        "skips the guards under a module whose attribute dicts are unchanged since the last call",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity < 100:
        parser.error(f"--sparsity must be in [0, 100), got {args.sparsity}")
    for name in ("threads", "rounds", "image"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(0)
    with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=args.dict_tag_guards):
        MODES[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
