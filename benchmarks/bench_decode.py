"""Greedy decoding with Hugging Face ``generate()``: a Llama model (random weights,
decoder linears magnitude-pruned, embeddings and LM head dense; or GPT-2, whose blocks'
Conv1D layers are pruned), its forward eager and compiled with ``backend="sparsecpu"``,
at several sparsities: tokens/s of the prefill (the prompt's forward call) and of decode
(one token per call), the whole call, and how many sparse ops a forward call ran.

    python benchmarks/bench_decode.py [--sparsities 0,50,70,90] [--prompt 64] [--new-tokens 32] [--rounds 3]
    python benchmarks/bench_decode.py --model gpt2 --sparsities 70
    python benchmarks/bench_decode.py --quantize int8 --sparsities 70
    python benchmarks/bench_decode.py --first-call [--rounds 2]

The model is compiled as Hugging Face recommends for decoding: a static KV cache
(``generation_config.cache_implementation = "static"``) and
``model.forward = torch.compile(model.forward, backend="sparsecpu", dynamic=True)``: one
prefill graph for every prompt length, one decode graph for every position. For each
sparsity the compiled model's tokens are checked against eager's first (a mismatch exits
non-zero, printing no timings); then rounds alternate an eager and a compiled
``generate()`` call and the medians over rounds are printed. Prefill and decode times
come from a wrapper around the forward. Layers below ``--min-sparsity`` (the backend
option, in percent, default 60 as the backend's) stay dense: at 0% and 50% the compiled
model is plain Inductor unless ``--min-sparsity`` is lowered (not to 0: the dense LM
head would then be packed too).

``--quantize int8``: a third copy of the model is compiled with
``options={"quantize": "int8"}`` (the decode graph's one-token linears go int8, the
prefill's stay fp32 unless their nonzeros come in 1 x 4 blocks: ``ops.int8_pays``) and
timed in the same interleaved rounds; its speed-up over the fp32 sparse model is the
median of the per-round ratios of the whole call. Its greedy tokens may legitimately
differ from eager's, so it is checked on logits instead: every step's logits against
eager's on the same tokens, within sparsecpu-bench's INT8_LOGITS_TOLERANCE of their
largest (else it exits non-zero, printing no timings).

``--first-call``: fresh processes with Inductor's caches off, alternating
``backend="inductor"`` and ``backend="sparsecpu"`` on the 70% model: the time of the
first compiled call (tracing, compiling and packing the prefill graph, and running it),
of the whole first ``generate()`` (the decode graph too), and the graphs compiled.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

import torch_sparsecpu
from torch_sparsecpu.backend import sparsecpu_backend
from torch_sparsecpu.bench.cli import INT8_LOGITS_TOLERANCE
from torch_sparsecpu.bench.measure import greedy_with_logits, step_logits_errors, warn_if_threads_sleep

from common import parse_int_list

# The models' sizes unless given: layers, hidden, intermediate, heads, vocab.
MODEL_SIZES = {"llama": (8, 1024, 2816, 16, 8192), "gpt2": (4, 768, 3072, 12, 8192)}


def build_model(args: argparse.Namespace, sparsity_pct: int) -> torch.nn.Module:
    """The benchmark's model (same random weights for every sparsity), its blocks'
    layers pruned, with a static KV cache for ``generate()``."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if args.model == "llama":
        config = transformers.LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            vocab_size=args.vocab,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        blocks, layer_types = model.model.layers, (torch.nn.Linear,)
    else:
        config = transformers.GPT2Config(
            n_layer=args.layers,
            n_embd=args.hidden,
            n_inner=args.intermediate,
            n_head=args.heads,
            vocab_size=args.vocab,
            n_positions=max(1024, args.prompt + args.new_tokens),
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config).eval()
        blocks, layer_types = model.transformer.h, (Conv1D,)
    torch_sparsecpu.magnitude_prune_(blocks, sparsity_pct / 100, layer_types=layer_types)
    model.generation_config.cache_implementation = "static"
    return model


class TimedForward:
    """A model's forward that records how long each call took (``functools.wraps``
    keeps its signature, which ``generate()`` inspects)."""

    def __init__(self, forward):
        functools.update_wrapper(self, forward)
        self.forward, self.seconds = forward, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        output = self.forward(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return output


class CountingBackend:
    """``backend="sparsecpu"`` (or Inductor), counting the graphs Dynamo compiles: by
    their compile id, as Dynamo hands a graph to the backend again when Inductor
    restarts its analysis (``TensorifyScalarRestartAnalysis``)."""

    def __init__(self, name: str, options: dict | None = None):
        self.name, self.options, self.compile_ids = name, options, set()

    @property
    def graphs(self) -> int:
        return len(self.compile_ids)

    def __call__(self, gm, example_inputs):
        compile_id = torch._guards.CompileContext.current_compile_id()
        self.compile_ids.add((compile_id.frame_id, compile_id.frame_compile_id))
        if self.name == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return sparsecpu_backend(gm, example_inputs, options=self.options)


def compiled_forward(model: torch.nn.Module, backend: CountingBackend) -> TimedForward:
    return TimedForward(torch.compile(model.forward, backend=backend, dynamic=True))


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Greedy ``generate()``; the tokens, and the call's seconds: whole, prefill, decode."""
    forward: TimedForward = model.forward
    forward.seconds.clear()
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    whole = time.perf_counter() - start
    return tokens, {"generate": whole, "prefill": forward.seconds[0], "decode": sum(forward.seconds[1:])}


def prompt_ids(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))


def int8_logits_error(eager: torch.nn.Module, quantized: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """The largest error of any step's logits of ``quantized``'s greedy ``generate()``
    against eager's logits for the same tokens, relative to the largest |eager logit| of
    the step."""
    generated, logits = greedy_with_logits(quantized, ids, new_tokens)
    return max(step_logits_errors(eager, ids, generated, logits))


def time_sparsity(args: argparse.Namespace, sparsity_pct: int) -> dict:
    """Checks, then times eager and compiled ``generate()`` (and with ``--quantize``, the
    quantized model) in interleaved rounds."""
    torch._dynamo.reset()
    eager = build_model(args, sparsity_pct)
    eager.forward = TimedForward(eager.forward)
    options = {"inner": args.inner, "min_sparsity": args.min_sparsity / 100}
    variants = {"sparsecpu": options}
    if args.quantize:
        variants["sparsecpu-" + args.quantize] = {**options, "quantize": args.quantize}
    compiled, backends = {}, {}
    for name, variant_options in variants.items():
        compiled[name] = build_model(args, sparsity_pct)
        backends[name] = CountingBackend("sparsecpu", variant_options)
        compiled[name].forward = compiled_forward(compiled[name], backends[name])
    ids = prompt_ids(args)
    expected, _ = generate(eager, ids, args.new_tokens)
    tokens, _ = generate(compiled["sparsecpu"], ids, args.new_tokens)  # compiles prefill and decode
    if not torch.equal(tokens, expected):
        sys.exit(f"error: {sparsity_pct}%: compiled tokens {tokens.tolist()} != eager {expected.tolist()}, no timings")
    result = {"sparsity": sparsity_pct}
    if args.quantize:
        quantized = compiled["sparsecpu-" + args.quantize]
        error = int8_logits_error(eager, quantized, ids, args.new_tokens)  # compiles prefill and decode
        if not error <= INT8_LOGITS_TOLERANCE:
            sys.exit(
                f"error: {sparsity_pct}%: {args.quantize} logits off eager's by {error:.3g} of their largest "
                f"(> {INT8_LOGITS_TOLERANCE}), no timings"
            )
        result["logits_error"] = error
    models = {"eager": eager, **compiled}
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(generate(model, ids, args.new_tokens)[1])
    with torch.profiler.profile() as profile:  # after the timings: the profiler slows the ops
        generate(compiled["sparsecpu"], ids, 2)  # a prefill and a decode call
    sparse_ops = sum(e.count for e in profile.key_averages() if e.key.startswith("sparsecpu::linear"))
    decode_calls = args.new_tokens - 1
    result.update(graphs=backends["sparsecpu"].graphs, sparse_ops_per_call=sparse_ops / 2)
    for name, rounds in times.items():
        result[name] = {
            "generate_ms": statistics.median(r["generate"] for r in rounds) * 1e3,
            "prefill_tok_s": statistics.median(args.prompt / r["prefill"] for r in rounds),
            "decode_tok_s": statistics.median(decode_calls / r["decode"] for r in rounds),
        }

    def speedup(baseline: str, name: str) -> float:  # the median of the per-round ratios
        return statistics.median(
            b["generate"] / r["generate"] for b, r in zip(times[baseline], times[name], strict=True)
        )

    result["speedup"] = speedup("eager", "sparsecpu")
    if args.quantize:
        name = "sparsecpu-" + args.quantize
        result["quantized"] = {**result.pop(name), "vs_eager": speedup("eager", name)}
        result["quantized"]["vs_fp32_sparse"] = speedup("sparsecpu", name)
        result["quantized"]["graphs"] = backends[name].graphs
    return result


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"{args.model} {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}; prompt {args.prompt} tokens, "
        f"{args.new_tokens} new (greedy, static cache); "
        f"{torch.get_num_threads()} threads, ISA {torch_sparsecpu.isa()}, inner {args.inner}; "
        f"medians over {args.rounds} interleaved round(s); tokens equal eager's at every sparsity"
    )
    header = (
        "sparsity  prefill tok/s eager  sparsecpu   decode tok/s eager  sparsecpu   "
        "generate ms eager  sparsecpu   speed-up  sparse ops per call  graphs"
    )
    print(header)
    for r in results:
        e, s = r["eager"], r["sparsecpu"]
        print(
            f"{r['sparsity']:>7}%  {e['prefill_tok_s']:>19.1f}  {s['prefill_tok_s']:>9.1f}"
            f"   {e['decode_tok_s']:>18.2f}  {s['decode_tok_s']:>9.2f}"
            f"   {e['generate_ms']:>17.1f}  {s['generate_ms']:>9.1f}   {r['speedup']:>7.2f}x"
            f"  {r['sparse_ops_per_call']:>19g}  {r['graphs']:>6}"
        )
    if args.quantize:
        print(
            f"--quantize {args.quantize} (its logits checked against eager's first, "
            f"max-abs relative <= {INT8_LOGITS_TOLERANCE}), the same rounds:"
        )
        print("sparsity  prefill tok/s  decode tok/s  generate ms   vs fp32 sparse  vs eager  max logits error  graphs")
        for r in results:
            q = r["quantized"]
            print(
                f"{r['sparsity']:>7}%  {q['prefill_tok_s']:>13.1f}  {q['decode_tok_s']:>12.2f}"
                f"  {q['generate_ms']:>11.1f}   {q['vs_fp32_sparse']:>13.2f}x  {q['vs_eager']:>7.2f}x"
                f"  {r['logits_error']:>16.3g}  {q['graphs']:>6}"
            )


def first_call_child(args: argparse.Namespace) -> int:
    """One fresh process: compile with ``args.first_call_child``, report as JSON."""
    model = build_model(args, 70)
    backend = CountingBackend(args.first_call_child)
    model.forward = compiled_forward(model, backend)
    _, seconds = generate(model, prompt_ids(args), args.new_tokens)
    print(
        json.dumps(
            {"first_call_s": seconds["prefill"], "first_generate_s": seconds["generate"], "graphs": backend.graphs}
        )
    )
    return 0


def first_call(args: argparse.Namespace, argv: Sequence[str]) -> int:
    environment = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    runs = {"inductor": [], "sparsecpu": []}
    for round_index in range(args.rounds):
        for backend in runs:
            command = [sys.executable, __file__, *argv, "--first-call-child", backend]
            child = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            if child.returncode != 0:
                sys.exit(f"error: the {backend} child failed:\n{child.stderr[-2000:]}")
            runs[backend].append(json.loads(child.stdout.strip().splitlines()[-1]))
            run = runs[backend][-1]
            print(
                f"round {round_index + 1}  {backend:<9}  first call {run['first_call_s']:7.1f} s   "
                f"first generate() {run['first_generate_s']:7.1f} s   graphs compiled {run['graphs']}",
                flush=True,
            )
    for backend, backend_runs in runs.items():
        print(
            f"median     {backend:<9}  first call {statistics.median(r['first_call_s'] for r in backend_runs):7.1f} s"
            f"   first generate() {statistics.median(r['first_generate_s'] for r in backend_runs):7.1f} s"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=parse_int_list, default=parse_int_list("0,50,70,90"))
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-sparsity", type=int, default=60, help="the backend option, in percent (default 60)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--model", choices=tuple(MODEL_SIZES), default="llama")
    parser.add_argument(
        "--quantize",
        choices=torch_sparsecpu.ops.QUANTIZED_DATATYPES,
        help="also time the model compiled with this quantize option",
    )
    sizes = ("layers", "hidden", "intermediate", "heads", "vocab")
    for size in sizes:
        parser.add_argument(f"--{size}", type=int, help="default: the model's, " + str(MODEL_SIZES))
    parser.add_argument("--first-call", action="store_true", help="compare the first compiled call with Inductor's")
    parser.add_argument("--first-call-child", choices=("inductor", "sparsecpu"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for size, default in zip(sizes, MODEL_SIZES[args.model], strict=True):
        setattr(args, size, getattr(args, size) or default)
    if args.new_tokens < 2 or args.prompt < 1 or args.rounds < 1:
        parser.error("--new-tokens must be >= 2, --prompt and --rounds >= 1")
    torch.set_num_threads(args.threads)
    if args.first_call_child:
        return first_call_child(args)
    if args.first_call:
        return first_call(args, [a for a in argv if a != "--first-call"])
    warn_if_threads_sleep()
    print_table(args, [time_sparsity(args, sparsity) for sparsity in args.sparsities])
    return 0


if __name__ == "__main__":
    sys.exit(main())
