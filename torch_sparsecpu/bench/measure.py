"""What the benchmarks measure and how: interleaved timing rounds, percentiles, the
relative error a compiled path is checked by, peak resident memory, the CPU's name and
the environment variables that move timings."""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch


def interleaved_rounds(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int,
    measure: Callable[[Callable[[], object]], float],
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> dict[str, list[float]]:
    """``measure(fn)`` of every candidate once per round, the candidates in turn, for
    ``rounds`` rounds; returns the samples per candidate in round order. Timing the
    candidates one after another, rather than each for a while, makes a slow spell of a
    noisy machine hit all of them alike: compare medians over rounds. ``progress`` wraps
    the rounds (a progress bar)."""
    warn_if_threads_sleep()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in progress(range(rounds)):
        for name, fn in candidates.items():
            samples[name].append(measure(fn))
    return samples


def call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one ``fn()`` call in milliseconds (a whole model call: long enough
    that the clock's resolution does not matter)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, interpolating between the two
    nearest ranks (numpy's default): 50 is the median."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the correctness contract's measure. A NaN
    counts as infinitely wrong, so does another shape; two all-zero results agree."""
    if actual.shape != expected.shape:
        return math.inf
    difference = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    error = difference.max().item() if difference.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return error / scale if scale else (0.0 if error == 0 else math.inf)


def greedy_with_logits(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens (Hugging Face causal LMs):
    (the generated tokens [batch, N], each step's logits [batch, vocab] as the forward
    returned them, before generate()'s logits processors)."""
    with torch.inference_mode():
        out = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, prompt.size(1) :], list(out.logits)


def step_logits_errors(
    eager_forward: Callable, prompt: torch.Tensor, generated: torch.Tensor, step_logits: Sequence[torch.Tensor]
) -> list[float]:
    """:func:`relative_error` of each generate() step's logits against eager's for the same
    tokens: ``eager_forward`` (a causal LM's uncompiled forward) run once, without a cache,
    over the prompt and the generated tokens but the last. For paths whose tokens may
    differ from eager's (quantized): this compares what they computed, token by token."""
    sequence = torch.cat([prompt, generated[:, :-1]], dim=1)
    with torch.inference_mode():
        expected = eager_forward(sequence, use_cache=False).logits[:, prompt.size(1) - 1 :]
    return [relative_error(logits.float(), expected[:, step].float()) for step, logits in enumerate(step_logits)]


# Linux resets the peak resident set size (VmHWM) of a process that writes "5" here.
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Starts a new peak for :func:`peak_rss_mb`; False where the OS does not allow it
    (the peak is then the process's since it started)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB since :func:`reset_peak_rss` (or since
    the process started)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Environment variables that decide how idle OpenMP threads wait, where threads run and how
# memory is paged: each moves timings, so the records keep the ones that are set.
TIMING_ENVIRONMENT = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "GOMP_CPU_AFFINITY",
    "KMP_AFFINITY",
    "THP_MEM_ALLOC_ENABLE",
)


def timing_environment() -> dict[str, str]:
    """The variables of ``TIMING_ENVIRONMENT`` set in this process, with their values."""
    return {name: os.environ[name] for name in TIMING_ENVIRONMENT if name in os.environ}


def sleeping_threads_warning(environment: Mapping[str, str]) -> str | None:
    """A warning when ``environment`` makes idle OpenMP threads sleep instead of spin
    (``OMP_WAIT_POLICY=passive``, ``GOMP_SPINCOUNT=0``, ``KMP_BLOCKTIME=0``), else None.
    A path of many short parallel regions (eager PyTorch, ``fuse_layers=False``) then
    waits for threads to wake at each and slows down far more than a fused one: speed-ups
    read too high (ResNet-50 4.9x eager instead of 3.7x, docs/benchmarks.md, "Sleeping
    waiters")."""
    sleeping = [
        f"{name}={value}"
        for name, value in environment.items()
        if (name == "OMP_WAIT_POLICY" and value.strip().lower() == "passive")
        or (name in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME") and value.strip() == "0")
    ]
    if not sleeping:
        return None
    return (
        f"warning: {', '.join(sleeping)}: idle OpenMP threads sleep between parallel regions, which slows a "
        "path of many short regions (eager PyTorch, fuse_layers=False) far more than a fused one, so speed-ups "
        'read too high (docs/benchmarks.md, "Sleeping waiters"); unset it to compare'
    )


def warn_if_threads_sleep() -> None:
    """Prints :func:`sleeping_threads_warning` for this process's environment to stderr,
    once per process, if there is one (every benchmark that times paths calls it)."""
    warning = sleeping_threads_warning(timing_environment())
    if warning is not None:
        _warn_once(warning)


@functools.cache
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr)
