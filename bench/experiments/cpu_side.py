"""The CPU side of lanes: does a step's CPU work (model rows to probabilities, range coding)
run side by side in threads, or does Python's GIL serialise it?

Each lane is a thread coding its own ``--streams`` rows per step through the model-only
predictor's table (its int24 weight rows for the int24 coder) and a range coder, from
stored random logits (no llama.cpp: this isolates the CPU work that a worker's lanes share). Rows per second are measured for 1 and for
``--lanes`` threads, with each range coder. On a GPU machine a lane's model step leaves the
GIL, so this CPU side is what limits the lanes of one process.

Usage: python bench/cpu_side.py [--streams 64] [--steps 40] [--lanes 2] [--vocab 49152] [--tag cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, machine  # noqa: E402

import numpy as np  # noqa: E402

from nacrith.coder import CODERS, make_encoder  # noqa: E402
from nacrith.predictors.llm import LogitTable  # noqa: E402


def lane(logits: np.ndarray, symbols: np.ndarray, coder: str, barrier: threading.Barrier, seconds: list, index: int) -> None:
    table = LogitTable(logits.shape[2], logits.shape[1], threads=1)
    encoder = make_encoder(coder)
    barrier.wait()
    began = time.perf_counter()
    rows = table.weight_rows if coder == "int24" and table.use_kernel else table.probabilities  # as LLMPredictor does
    for step in range(len(symbols)):
        encoder.encode(symbols[step], rows(logits[step % len(logits)]))
    encoder.finish()
    seconds[index] = time.perf_counter() - began


def rows_per_second(lanes: int, logits, symbols, coder: str) -> float:
    barrier, seconds = threading.Barrier(lanes), [0.0] * lanes
    threads = [threading.Thread(target=lane, args=(logits, symbols, coder, barrier, seconds, i)) for i in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return lanes * symbols.size / max(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, args.streams, args.vocab), np.float32) * 3  # four steps' rows, reused
    symbols = rng.integers(0, args.vocab, (args.steps, args.streams)).astype(np.int32)
    rows = []
    for coder in CODERS:
        rate = {lanes: rows_per_second(lanes, logits, symbols, coder) for lanes in (1, args.lanes)}
        row = {"coder": coder, "lanes": args.lanes, "rows_s_1": rate[1], f"rows_s_{args.lanes}": rate[args.lanes], "speedup": rate[args.lanes] / rate[1]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu-side-{args.tag}.json").write_text(json.dumps({"streams": args.streams, "steps": args.steps, "vocab": args.vocab, "machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
