"""The ensemble's CPU cost per token without the model: C kernel passes against Python.

Replays the first ``--tokens`` logits rows that ``bench/experiments/hidden_replay.py dump FILE`` stored
(the default lockstep schedule, 16 streams for a Canterbury text) through the default
ensemble and the int24 coder, all rows loaded in memory first, and times each call into
nacrith's C kernel (``--paths``: the float64 rows handed to the coder, or the fused C step
the lockstep loop uses, which makes, mixes, codes and learns each stream's row in one call
per step); the rest of the wall time is the ensemble's Python (per-stream
candidates, mixer, n-gram and match updates) and the loop. Prints the coded bytes' and
the mixer weights' hashes, so two versions of the code can be checked for the same bits.
Results are appended to bench/results/ensemble-replay.json. Usage:
    python bench/experiments/hidden_replay.py dump asyoulik.txt
    python bench/ensemble_replay.py asyoulik.txt --tokens 12000 --repeat 2 --paths both --tag ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import TimedKernels, append_results, replay_steps, stored_steps  # noqa: E402

from nacrith.coder import make_encoder  # noqa: E402
from nacrith.predictors import EnsembleConfig, EnsemblePredictor  # noqa: E402
from nacrith.predictors import ensemble as ensemble_module  # noqa: E402
from nacrith.predictors import llm as llm_module  # noqa: E402
from nacrith import coder as coder_module  # noqa: E402


def run(folder: Path, name: str, limit: int, fused: bool = False) -> dict:
    rows, running, symbols, meta = stored_steps(folder, name, limit)  # in memory before the clock starts
    tokens = len(rows)
    timed = TimedKernels(llm_module._kernels)
    saved = llm_module._kernels, ensemble_module._kernels, coder_module._kernels
    llm_module._kernels = ensemble_module._kernels = coder_module._kernels = timed
    try:
        predictor = EnsemblePredictor(rows.shape[1], int(running[0]), EnsembleConfig(), list(meta["pieces"]))
        predictor.use_int24_rows(fused)  # as the lockstep loop does for the int24 coder (fused: one C pass per stream)
        encoder = make_encoder("int24")
        began = time.perf_counter()
        for step_tokens, probabilities in replay_steps(predictor, rows, running, symbols):
            encoder.encode(step_tokens, probabilities)
        wall = time.perf_counter() - began
    finally:
        llm_module._kernels, ensemble_module._kernels, coder_module._kernels = saved
    kernel = timed.total
    return {"file": name, "tokens": tokens, "streams": int(running[0]), "fused": fused, "us_per_token": round(wall / tokens * 1e6, 1),
            "kernel_us_per_token": round(kernel / tokens * 1e6, 1), "python_us_per_token": round((wall - kernel) / tokens * 1e6, 1),
            "kernel_calls_us_per_token": {k: round(v / tokens * 1e6, 1) for k, v in sorted(timed.seconds.items())},
            "coded_sha256": hashlib.sha256(encoder.finish()).hexdigest()[:16],
            "weights_sha256": hashlib.sha256(np.array([w for stream in predictor.streams for row in stream.weights for w in row]).tobytes()).hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--tokens", type=int, default=12000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--paths", default="rows", help="rows (float64 rows, then coder), fused (the C step), or both, alternating")
    args = parser.parse_args()
    if llm_module._kernels is None:
        print("nacrith's C kernel is not built: nothing to time", file=sys.stderr)
        return 1
    results = []
    paths = {"rows": [False], "fused": [True], "both": [False, True]}[args.paths]
    for _ in range(args.repeat):
        for fused in paths:
            results.append({"tag": args.tag, **run(args.dir, args.file, args.tokens, fused)})
            print(json.dumps(results[-1]), flush=True)
    append_results("ensemble-replay.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
