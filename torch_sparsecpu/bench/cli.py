"""sparsecpu-bench: is my model faster with backend="sparsecpu", and by how much, on this
machine?

Builds the model from its config with random weights (a fixed seed; nothing is
downloaded), magnitude-prunes it, and runs it several ways ("paths"): eager PyTorch, the
reference, and each path of --compare. Every path's first output is checked against eager's
before anything is timed (a mismatch stops the run: exit status 1, no timings). Then the paths
are timed in interleaved rounds in this one process, on the same threads: each round calls
every path once, so a slow spell of the machine hits all of them alike. Medians and 90th
percentiles over the rounds are printed.

With --decode N (causal LMs), each call is a greedy generate() of N new tokens after a
--seq-token prompt, with the model's forward compiled; prefill (the time to the first
token) and decode (tokens per second after it) are reported apart, and each path's tokens
must equal eager's.

The sparsecpu-int8 path (options={"quantize": "int8"}) is approximate: its output must be
within INT8_TOLERANCE of eager's (max-abs relative); under --decode, its logits at every
step within INT8_LOGITS_TOLERANCE of eager's for the same tokens, and the share of its
greedy tokens equal to eager's is reported, not required (int8 may pick another of two
close tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

import torch_sparsecpu

from ..kernels import torch_threads
from .measure import (
    call_ms,
    cpu_model_name,
    interleaved_rounds,
    peak_rss_mb,
    percentile,
    relative_error,
    reset_peak_rss,
    step_logits_errors,
    timing_environment,
)
from .models import (
    BLOCK_SHAPES,
    IMAGE,
    NAMED_MODELS,
    BenchModel,
    ConfigFieldError,
    ModelSpec,
    build_model,
    parse_config_item,
    resolve_model,
)

PROG = "sparsecpu-bench"


@dataclass(frozen=True)
class BenchPath:
    """One way to run the model: as it is (eager), or compiled with a backend and options."""

    description: str
    backend: str | Callable | None = None  # torch.compile backend; None runs the model as it is
    options: Mapping[str, object] | None = None
    # None: the model's fp32 tolerance, and generated tokens must equal eager's. An
    # approximate path (quantized) sets its own, for one call's output and (--decode) for
    # every step's logits; its token agreement is reported instead.
    tolerance: float | None = None
    logits_tolerance: float | None = None

    def prepare(self, fn: Callable, dynamic: bool | None = None) -> Callable:
        if self.backend is None:
            return fn
        options = dict(self.options) if self.options else None
        return torch.compile(fn, backend=self.backend, dynamic=dynamic, options=options)


# The int8 path's tolerances, max |output - eager's| / max |eager's|. One call's output:
# int8 moves it by 0.7-2% of its scale (docs/benchmarks.md#int8-accuracy-int8_accuracypy).
# A decode step's logits, against eager's for the same tokens: errors add up over every
# int8 layer of a deep model, 3.5-5.2% on llama-tiny at 70% (8 layers, 56 int8 linears;
# torch.ao's quantize_dynamic of the same layers: 5.7-9.3%). A wrong scale, zero point
# or dropped block moves them far more.
INT8_TOLERANCE = 5e-2
INT8_LOGITS_TOLERANCE = 1e-1

REFERENCE = "eager"
PATHS: dict[str, BenchPath] = {
    REFERENCE: BenchPath("PyTorch eager, dense weights"),
    "inductor": BenchPath("torch.compile, Inductor, dense weights", backend="inductor"),
    "sparsecpu": BenchPath('torch.compile(backend="sparsecpu"): sparse kernels, Inductor for the rest', "sparsecpu"),
    "sparsecpu-int8": BenchPath(
        'torch.compile(backend="sparsecpu", options={"quantize": "int8"}): int8 sparse kernels where '
        "ops.int8_pays, fp32 sparse elsewhere",
        "sparsecpu",
        {"quantize": "int8"},
        tolerance=INT8_TOLERANCE,
        logits_tolerance=INT8_LOGITS_TOLERANCE,
    ),
}


class ResultMismatch(RuntimeError):
    """A path disagrees with eager: none of its timings may be shown."""


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr, exit status 2 (argparse prints the usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _paths_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown path {', '.join(unknown)!r}; known: {', '.join(PATHS)}")
    # eager is the reference of every check and speed-up: always run, first
    return [REFERENCE, *dict.fromkeys(name for name in names if name != REFERENCE)]


def _config_item(text: str) -> tuple[str, object]:
    try:
        return parse_config_item(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  {PROG} --model bert-base --compare eager,inductor,sparsecpu --json bert.json\n"
        f"  {PROG} --model llama-tiny --seq 32 --decode 64 --plot llama.png",
    )
    parser.add_argument(
        "--model",
        default="mlp",
        help=f"{', '.join(NAMED_MODELS)}, or a Hugging Face model type (gpt2, vit, qwen2 ...) "
        "built offline by transformers.AutoConfig.for_model (default mlp)",
    )
    parser.add_argument(
        "--config",
        metavar="KEY=VALUE",
        type=_config_item,
        action="append",
        default=[],
        help="change a field of the model's config, e.g. --config num_hidden_layers=2 (repeatable)",
    )
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="fraction of each pruned weight zeroed (default 0.9)"
    )
    parser.add_argument(
        "--block",
        default="1x1",
        help=f"pruning block, output x input features of the weight: {', '.join(BLOCK_SHAPES)} "
        "(none = 1x1, default; 1x4 is what the int8 kernels want); the pruner has no other shapes",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences or images per call (default 1)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (mlp: rows of features; default 128)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch threads (default {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--compare",
        type=_paths_list,
        default=_paths_list("eager,sparsecpu"),
        help=f"comma-separated paths among {', '.join(PATHS)}; eager, the reference, always runs "
        "(default eager,sparsecpu)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds, one call of each path each (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each path after its first (default 3)")
    parser.add_argument(
        "--decode",
        type=int,
        metavar="N",
        help="causal LMs: time greedy generate() of N new tokens after the --seq-token prompt",
    )
    parser.add_argument("--json", type=pathlib.Path, metavar="PATH", help="write one record per path to PATH")
    parser.add_argument(
        "--plot", type=pathlib.Path, metavar="PATH", help="bar chart of latency and speed-up (needs matplotlib)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, ModelSpec]:
    """The arguments and the model they name; a bad one exits with status 2 and one line
    on stderr naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        parser.error(f"argument --sparsity: must be in [0, 1), got {args.sparsity:g}")
    block = "1x1" if args.block == "none" else args.block
    if block not in BLOCK_SHAPES:
        parser.error(
            f"argument --block: magnitude_prune_ cannot prune {args.block!r} blocks; "
            f"it prunes {', '.join(BLOCK_SHAPES)}"
        )
    args.block = block
    for flag, value, least in (
        ("--batch", args.batch, 1),
        ("--seq", args.seq, 1),
        ("--threads", args.threads, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < least:
            parser.error(f"argument {flag}: must be at least {least}, got {value}")
    try:
        spec = resolve_model(args.model, dict(args.config))
    except ConfigFieldError as error:
        parser.error(f"argument --config: {error}")
    except ValueError as error:
        parser.error(f"argument --model: {error}")
    if args.decode is not None:
        if not spec.causal_lm:
            parser.error(f"argument --decode: {args.model} is not a causal language model; it generates no tokens")
        if args.decode < 2:
            parser.error(
                f"argument --decode: must be at least 2 (the first token comes from the prefill), got {args.decode}"
            )
    positions = args.seq + (args.decode or 0)
    if spec.input_kind != IMAGE and spec.max_positions and positions > spec.max_positions:
        parser.error(f"argument --seq: {args.model} takes at most {spec.max_positions} positions, asked {positions}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"argument {flag}: folder {str(path.parent)!r} does not exist")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib (pip install 'torch_sparsecpu[bench]')")
    return args, spec


# --------------------------------------------------------------------------- running


def _progress(iterable: Iterable, description: str, total: int | None = None) -> Iterable:
    """A tqdm bar on stderr, or just the iterable where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # disable=None: no bar where stderr is not a terminal (a log file, a test)
    return tqdm(iterable, desc=description, total=total, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


@dataclass
class FirstCall:
    """A path's first call: it compiles (compile_s includes that), is checked against eager."""

    compile_s: float
    peak_rss_mb: float
    max_error: float | None  # forward runs: relative to eager
    tokens_match: float | None  # decode runs: fraction of generated tokens equal to eager's


def _first_call(fn: Callable[[], object]) -> tuple[object, float, float]:
    reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, peak_rss_mb()


def _sparse_layers(model: BenchModel, path: BenchPath, decode: bool = False) -> str | None:
    """How many layers run sparse under a sparsecpu path, as "taken/total" (from
    torch_sparsecpu.explain on one call's inputs), with how many of them run int8 under
    a quantizing path ("taken/total, N int8"); None for other paths. With ``decode`` the
    int8 count is given for the prompt and for a one-token decode step apart: the
    per-layer rule (ops.int8_pays) may pick int8 for one and fp32 for the other."""
    if path.backend != "sparsecpu":
        return None
    options = dict(path.options or {})
    decisions = torch_sparsecpu.explain(model.module, *model.inputs, **options)
    counts = f"{sum(d.taken for d in decisions)}/{len(decisions)}"
    if options.get("quantize") is None:
        return counts

    def quantized(decisions) -> int:
        return sum(d.taken and d.datatype != "f32" for d in decisions)

    if not decode:
        return f"{counts}, {quantized(decisions)} {options['quantize']}"
    (prompt,) = model.inputs
    step = torch_sparsecpu.explain(model.module, prompt[:, -1:], **options)
    return f"{counts}, {options['quantize']}: {quantized(decisions)} in the prompt, {quantized(step)} in a decode step"


def run_forward(model: BenchModel, names: Sequence[str], repeats: int, warmup: int):
    """Checks, then times one forward call per path; returns (first calls, samples in ms)."""
    calls = {name: functools.partial(PATHS[name].prepare(model.module), *model.inputs) for name in names}
    first: dict[str, FirstCall] = {}
    expected = None  # eager's output: names[0] is eager
    for name in _progress(names, "first calls (compiling) and checks"):
        result, compile_s, peak = _first_call(calls[name])
        output = model.output(result)
        expected = output if expected is None else expected
        error = relative_error(output, expected)
        tolerance = PATHS[name].tolerance or model.spec.tolerance
        if not error <= tolerance:
            raise ResultMismatch(
                f"{name}'s output differs from eager's by {error:.3g} relative (tolerance {tolerance:g}); "
                "no timings reported"
            )
        first[name] = FirstCall(compile_s, peak, error, None)
    del expected
    for _ in _progress(range(warmup), "warm-up"):
        for fn in calls.values():
            fn()
    samples = interleaved_rounds(calls, repeats, call_ms, functools.partial(_progress, description="timing"))
    return first, samples


@dataclass
class GenerateTiming:
    """One greedy generate() call, timed by a logits processor that notes when the logits
    of each new token are ready: the first after the prefill, then one per decode step."""

    total_ms: float
    prefill_ms: float
    decode_ms_per_token: float
    tokens: torch.Tensor  # the generated token ids [batch, N]
    logits: torch.Tensor | None = None  # [batch, N, vocab], when asked for (the checked first call)


class _StepClock:
    """A generate() logits processor that only notes the time it is called."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _generate_timed(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, keep_logits: bool = False
) -> GenerateTiming:
    """One timed greedy generate(); with ``keep_logits`` also the model's logits of every
    step (as the forward returned them, before generate()'s processors)."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # no early end of sequence: every path makes N tokens
        do_sample=False,
        pad_token_id=0,  # unused (no padding); set so generate() does not warn
        cache_implementation="static",  # see _with_compiled_forward
        logits_processor=LogitsProcessorList([clock]),
        output_logits=keep_logits,
        return_dict_in_generate=keep_logits,
    )
    end = time.perf_counter()
    sequences = output.sequences if keep_logits else output
    steps = clock.times
    return GenerateTiming(
        total_ms=(end - start) * 1e3,
        prefill_ms=(steps[0] - start) * 1e3,
        decode_ms_per_token=(steps[-1] - steps[0]) * 1e3 / (len(steps) - 1),
        tokens=sequences[:, input_ids.size(1) :],
        logits=torch.stack(output.logits, dim=1) if keep_logits else None,
    )


def _with_compiled_forward(module: torch.nn.Module, path: BenchPath) -> torch.nn.Module:
    """``module`` for generate() with its forward run by ``path``. A shallow copy shares every
    parameter and submodule with ``module``; only its forward differs. The forward is
    compiled as README's decoding recipe says: with generate()'s static KV cache (every
    step sees the same shapes) and ``dynamic=True``, a prefill and a decode graph serve
    every prompt length and every step."""
    if path.backend is None:
        return module
    runner = copy.copy(module)
    runner.forward = path.prepare(module.forward, dynamic=True)
    return runner


def run_decode(model: BenchModel, names: Sequence[str], repeats: int, warmup: int, new_tokens: int):
    """Checks, then times one generate() per path; returns (first calls, GenerateTimings).
    A path with a logits tolerance is checked on its logits, against eager's for the
    tokens it generated."""
    (input_ids,) = model.inputs
    runners = {name: _with_compiled_forward(model.module, PATHS[name]) for name in names}
    calls = {name: functools.partial(_generate_timed, runners[name], input_ids, new_tokens) for name in names}
    first: dict[str, FirstCall] = {}
    expected = None  # eager's tokens: names[0] is eager
    for name in _progress(names, "first generate() calls (compiling) and checks"):
        tolerance = PATHS[name].logits_tolerance
        checked = functools.partial(calls[name], keep_logits=tolerance is not None)
        timing, compile_s, peak = _first_call(checked)
        expected = timing.tokens if expected is None else expected
        same = (timing.tokens == expected).float().mean().item()
        if same < 1 and tolerance is None:
            position = int((timing.tokens != expected).any(dim=0).nonzero()[0])
            raise ResultMismatch(
                f"{name} generated other tokens than eager from new token {position} on "
                f"({timing.tokens[:, position].tolist()} instead of {expected[:, position].tolist()}); "
                "no timings reported"
            )
        error = None
        if tolerance is not None:
            error = max(step_logits_errors(model.module, input_ids, timing.tokens, timing.logits.unbind(1)))
            if not error <= tolerance:
                raise ResultMismatch(
                    f"{name}'s logits differ from eager's for the same tokens by {error:.3g} relative "
                    f"(tolerance {tolerance:g}); no timings reported"
                )
        first[name] = FirstCall(compile_s, peak, error, same)
    for _ in _progress(range(warmup), "warm-up"):
        for fn in calls.values():
            fn()
    samples = interleaved_rounds(calls, repeats, lambda fn: fn(), functools.partial(_progress, description="timing"))
    return first, samples


# --------------------------------------------------------------------------- reporting


def make_records(
    args, model: BenchModel, first: dict[str, FirstCall], samples: dict, sparse_layers: dict
) -> list[dict]:
    """One JSON-ready record per path, eager first."""
    spec = model.spec
    common = {
        "model": spec.name,
        "sparsity": args.sparsity,
        "block": args.block,
        "batch": args.batch,
        "seq": None if spec.input_kind == IMAGE else args.seq,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "isa": torch_sparsecpu.isa(),
        "torch": torch.__version__,
        "cpu": cpu_model_name(),
        "environment": timing_environment(),
    }
    totals = {name: [t.total_ms for t in times] if args.decode else list(times) for name, times in samples.items()}
    reference_ms = statistics.median(totals[REFERENCE])
    records = []
    for name, times in samples.items():
        median_ms = statistics.median(totals[name])
        record = {
            "path": name,
            **common,
            "median_ms": median_ms,
            "p90_ms": percentile(totals[name], 90),
            "speedup": reference_ms / median_ms,
            "compile_s": first[name].compile_s,
            "peak_rss_mb": first[name].peak_rss_mb,
            "max_error": first[name].max_error,
            "sparse_layers": sparse_layers.get(name),
        }
        if args.decode:
            prefill = [t.prefill_ms for t in times]
            per_token = statistics.median(t.decode_ms_per_token for t in times)
            reference_per_token = statistics.median(t.decode_ms_per_token for t in samples[REFERENCE])
            record |= {
                "throughput": args.batch * args.decode / (median_ms / 1e3),
                "throughput_unit": "generated tokens/s",
                "decode_tokens": args.decode,
                "prefill_ms": statistics.median(prefill),
                "prefill_p90_ms": percentile(prefill, 90),
                "prefill_speedup": statistics.median(t.prefill_ms for t in samples[REFERENCE])
                / statistics.median(prefill),
                "decode_ms_per_token": per_token,
                "decode_tokens_per_s": args.batch * 1e3 / per_token,
                "decode_speedup": reference_per_token / per_token,
                "tokens_match": first[name].tokens_match,
            }
        else:
            record |= {"throughput": args.batch / (median_ms / 1e3), "throughput_unit": "items/s"}
        records.append(record)
    return records


def format_table(records: Sequence[dict], decode: bool) -> str:
    """An aligned plain-text table, one row per path."""

    def number(key: str, spec: str, suffix: str = "") -> Callable[[dict], str]:
        return lambda record: format(record[key], spec) + suffix

    columns: list[tuple[str, Callable[[dict], str]]] = [("path", lambda record: record["path"])]
    if decode:
        columns += [
            ("prefill ms", number("prefill_ms", ".2f")),
            ("decode tok/s", number("decode_tokens_per_s", ".1f")),
            ("prefill speed-up", number("prefill_speedup", ".2f", "x")),
            ("decode speed-up", number("decode_speedup", ".2f", "x")),
            ("generate ms", number("median_ms", ".1f")),
            ("p90 ms", number("p90_ms", ".1f")),
        ]
    else:
        columns += [
            ("median ms", number("median_ms", ".2f")),
            ("p90 ms", number("p90_ms", ".2f")),
            ("items/s", number("throughput", ".1f")),
            ("speed-up", number("speedup", ".2f", "x")),
        ]
    columns += [("first call s", number("compile_s", ".1f")), ("peak RSS MB", number("peak_rss_mb", ".0f"))]
    rows = [[cell(record) for _, cell in columns] for record in records]
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, (header, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        # the path name aligns left, numbers right
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line([header for header, _ in columns]), *map(line, rows)])


def plot(records: Sequence[dict], path: pathlib.Path, title: str, decode: bool) -> None:
    """Two bar charts side by side: latency (prefill for --decode) and speed-up over eager."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [record["path"] for record in records]
    figure, (latency, speedup) = plt.subplots(1, 2, figsize=(10, 3.8))
    if decode:
        latency.bar(names, [r["prefill_ms"] for r in records])
        latency.set_ylabel("prefill, median ms")
        width = 0.4
        positions = range(len(names))
        speedup.bar([p - width / 2 for p in positions], [r["prefill_speedup"] for r in records], width, label="prefill")
        speedup.bar([p + width / 2 for p in positions], [r["decode_speedup"] for r in records], width, label="decode")
        speedup.set_xticks(list(positions), names)
        speedup.legend()
    else:
        medians = [r["median_ms"] for r in records]
        above = [r["p90_ms"] - r["median_ms"] for r in records]
        latency.bar(names, medians, yerr=[[0] * len(records), above], capsize=4)
        latency.set_ylabel("median ms (bar to p90)")
        speedup.bar(names, [r["speedup"] for r in records])
    speedup.axhline(1.0, color="gray", linewidth=0.8)
    speedup.set_ylabel("speed-up over eager")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe_input(model: BenchModel, args) -> str:
    if model.spec.input_kind == IMAGE:
        _, channels, height, width = model.inputs[0].shape
        return f"{args.batch} image(s) {channels} x {height} x {width}"
    unit = "rows of features" if model.spec.model_class is None else "tokens"
    prompt = f", then {args.decode} new tokens, greedy" if args.decode else ""
    return f"batch {args.batch} x {args.seq} {unit}{prompt}"


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Only transformers' errors are logged inside the block (building models from configs
    and generate() warn about things that do not matter here)."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def main(argv: Sequence[str] | None = None) -> int:
    args, spec = parse_arguments(argv)
    # Every compiled path (and explain) caches graphs on the same forward, generate() a
    # prefill and decode graphs per path: past Dynamo's default limit of 8 a function
    # would silently run eagerly. The settings hold for this run only.
    with torch_threads(args.threads), torch._dynamo.config.patch(recompile_limit=64), _transformers_quiet():
        return run(args, spec)


def run(args: argparse.Namespace, spec: ModelSpec) -> int:
    """Builds, checks, times and reports (main's work, with its settings in force)."""
    block_rows, block_cols = BLOCK_SHAPES[args.block]
    model = build_model(
        spec,
        sparsity=args.sparsity,
        block_rows=block_rows,
        block_cols=block_cols,
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
    )
    print(f"{PROG}: {spec.name}: {spec.description}; random weights (seed {args.seed})")
    print(f"  pruned: {len(model.pruned_layers)} layers to {args.sparsity:.0%} in {args.block} blocks")
    print(f"  input: {describe_input(model, args)}")
    print(
        f"  machine: {cpu_model_name()}, {args.threads} threads, sparse kernels {torch_sparsecpu.isa()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    if environment := timing_environment():
        print(f"  environment: {', '.join(f'{name}={value}' for name, value in environment.items())}", flush=True)
    with torch.inference_mode():
        try:
            if args.decode:
                first, samples = run_decode(model, args.compare, args.repeats, args.warmup, args.decode)
            else:
                first, samples = run_forward(model, args.compare, args.repeats, args.warmup)
        except ResultMismatch as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1
        sparse_layers = {name: _sparse_layers(model, PATHS[name], bool(args.decode)) for name in args.compare}
    for name in args.compare:
        if name == REFERENCE:
            checked = "the reference"
        elif args.decode:
            checked = f"{first[name].tokens_match:.0%} of the tokens equal eager's"
            if first[name].max_error is not None:
                checked += f", logits max error {first[name].max_error:.1e} relative to eager's"
        else:
            checked = f"max error {first[name].max_error:.1e} relative to eager"
        layers = f"; {sparse_layers[name]} layers sparse" if sparse_layers[name] else ""
        print(f"  {name}: {PATHS[name].description}; {checked}{layers}")
    records = make_records(args, model, first, samples, sparse_layers)
    print()
    print(format_table(records, bool(args.decode)))
    print(
        f"\nmedian and 90th percentile of {args.repeats} interleaved rounds (each calls every path once) after "
        f"{args.warmup} warm-up call(s) per path;\nfirst call: compiling included; peak RSS: the process's peak "
        "resident memory while the path made its first call"
    )
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        title = (
            f"{spec.name}, {args.sparsity:.0%} sparse ({args.block} blocks), {describe_input(model, args)}, "
            f"{args.threads} threads"
        )
        plot(records, args.plot, title, bool(args.decode))
        print(f"wrote {args.plot}")
    return 0
