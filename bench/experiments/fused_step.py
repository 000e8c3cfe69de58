"""Time the ensemble's fused C step (``ensemble_int24``) alone, on rows in the CPU's cache.

Calls ``nacrith._kernels.ensemble_int24`` on ``--streams`` streams of random logits (normal,
sd 4) with both bias tables (3 class rows, 256 context rows) and two candidates per stream,
``--calls`` times in one process, and reports each call's CPU time per token (thread time,
so time stolen by other guests of a VM counts less): the minimum and the median. It makes
two builds of the kernel comparable: run it with each in turn, several times, and compare
the distributions. ``--processes N`` runs N copies at once in forked processes (one row per
copy), as N workers would share a host's cores and memory. Appends to
bench/results/fused-step.json. Usage:
    python bench/fused_step.py --tag "..." [--streams 16 --vocab 49152 --calls 40 --processes 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_results, machine  # noqa: E402

from nacrith.predictors.llm import _SCALE, _kernels  # noqa: E402


def time_calls(streams: int, vocab: int, calls: int) -> list[float]:
    """CPU microseconds per token of each of ``calls`` fused steps over the same inputs."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(streams, vocab)) * 4).astype(np.float32)
    bias, context = np.zeros((3, vocab), np.float32), np.zeros((256, vocab), np.float32)
    tables = (bias, rng.integers(0, 3, streams), np.zeros_like(bias), 0.5, context, rng.integers(0, 256, streams), np.zeros_like(context), 0.3, 1.0)
    mix = (np.full(streams, 0.8), np.arange(streams + 1, dtype=np.int64) * 2, rng.integers(0, vocab, 2 * streams), np.full(2 * streams, 0.01))
    symbols = rng.integers(0, vocab, streams).astype(np.int32)
    times = []
    for _ in range(calls):
        outputs = tuple(np.empty(streams) for _ in range(4))
        state, words = np.array([0, 2**64 - 1, 0, 0], np.uint64), np.empty(streams + 8, np.uint32)
        began = time.thread_time()
        _kernels.ensemble_int24(True, logits, np.arange(streams), np.empty((0, vocab)), symbols, vocab, float(_SCALE), 1.0, tables, mix,
                                outputs, state, words)
        times.append((time.thread_time() - began) / streams * 1e6)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if _kernels is None:
        print("nacrith's C kernel is not built: nothing to time", file=sys.stderr)
        return 1
    if args.processes == 1:
        runs = [time_calls(args.streams, args.vocab, args.calls)]
    else:
        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            runs = pool.starmap(time_calls, [(args.streams, args.vocab, args.calls)] * args.processes)
    rows = []
    for copy, times in enumerate(runs):
        rows.append({"tag": args.tag, "machine": machine(), "streams": args.streams, "vocab": args.vocab, "calls": args.calls,
                     "processes": args.processes, "copy": copy, "min_us_per_token": round(min(times), 1),
                     "median_us_per_token": round(statistics.median(times), 1)})
        print(json.dumps(rows[-1]))
    append_results("fused-step.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
