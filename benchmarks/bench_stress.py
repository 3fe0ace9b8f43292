"""Under load: many Python threads call one compiled model at once for a while, with its
weights fixed. Every output must be bitwise identical to the first one for the same
input (no torn repack, no race in the ops' tables), no call may raise, and the resident
memory must stay flat once warm. Exits with status 1 otherwise.

    .venv/bin/python benchmarks/bench_stress.py [--threads 8] [--seconds 60] [--tokens 32]

Default model: Hugging Face BERT-base (random init, every encoder linear magnitude-pruned
to 90%), compiled whole with backend="sparsecpu"; each Python thread has its own input.
torch's intra-op threads stay as they are (set them with --torch-threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

import torch_sparsecpu
from torch_sparsecpu.bench.models import build_model, resolve_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=8, help="Python threads calling the model")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=32, help="sequence length of each input")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument(
        "--rss-limit-mb",
        type=float,
        default=20.0,
        help="allowed RSS growth between the end of the first quarter and the end",
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model = build_model(resolve_model("bert-base"), sparsity=args.sparsity).module
    compiled = torch.compile(model, backend="sparsecpu")
    inputs = [
        torch.randint(0, 30522, (1, args.tokens), generator=torch.Generator().manual_seed(i))
        for i in range(args.threads)
    ]
    with torch.inference_mode():
        started = time.perf_counter()
        first = [compiled(ids).last_hidden_state.clone() for ids in inputs]
        compile_s = time.perf_counter() - started
        for ids, output in zip(inputs, first, strict=True):
            expected = model(ids).last_hidden_state
            error = ((output - expected).abs().max() / expected.abs().max()).item()
            if error > 1e-4:
                print(f"compiled output differs from eager: relative error {error:.3g}")
                return 1
    print(
        f"torch {torch.__version__}, kernels {torch_sparsecpu.isa()}, {torch.get_num_threads()} torch threads; "
        f"BERT-base at {args.sparsity:.0%}, {args.tokens} tokens; first calls {compile_s:.1f} s"
    )

    stop = threading.Event()
    calls = [0] * args.threads
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    output = compiled(inputs[index]).last_hidden_state
                    if not torch.equal(output, first[index]):
                        failures.append(f"thread {index}, call {calls[index]}: output differs from the first")
                        stop.set()
                    calls[index] += 1
        except Exception as error:  # noqa: BLE001  (any error fails the run)
            failures.append(f"thread {index}: {type(error).__name__}: {error}")
            stop.set()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    samples: list[tuple[float, float]] = []
    begin = time.perf_counter()
    for thread in workers:
        thread.start()
    while not stop.is_set() and time.perf_counter() - begin < args.seconds:
        samples.append((time.perf_counter() - begin, rss_mb()))
        time.sleep(1.0)
    stop.set()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - begin
    samples.append((elapsed, rss_mb()))

    warm = next((mb for t, mb in samples if t >= elapsed / 4), samples[0][1])
    growth = samples[-1][1] - warm
    total = sum(calls)
    print(
        f"{args.threads} threads x {elapsed:.0f} s: {total} calls ({total / elapsed:.1f}/s), "
        f"per thread {min(calls)}-{max(calls)}"
    )
    print(
        f"RSS: start {samples[0][1]:.0f} MB, after a quarter {warm:.0f} MB, end {samples[-1][1]:.0f} MB, "
        f"max {max(mb for _, mb in samples):.0f} MB; growth after warm-up {growth:+.1f} MB "
        f"(limit {args.rss_limit_mb} MB)"
    )
    for failure in failures[:10]:
        print("FAIL:", failure)
    ok = not failures and growth <= args.rss_limit_mb and min(calls) > 0
    print("OK: no error, every output identical to the first, RSS flat" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
