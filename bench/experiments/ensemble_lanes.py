"""Does the ensemble's CPU side scale over lanes (threads of one process) as over processes?

Replays stored logits rows (``bench/experiments/hidden_replay.py dump``) through the default ensemble
and the int24 coder (the fused C step, as a worker runs it; rows tagged before it ran the
float64 rows), as ``bench/experiments/ensemble_replay.py`` does, once alone and then N copies at
once: in N threads of this process (as a worker's lanes run; the C kernel's passes release
Python's GIL, the ensemble's Python does not), and in N forked processes. Every copy codes
the same rows, so every copy must give the same size. Appends to
bench/results/ensemble-lanes.json. Usage:
    python bench/experiments/hidden_replay.py dump bible.txt --streams 256 --bytes 240000
    python bench/ensemble_lanes.py bible.txt.256s.240000b --tokens 6100 --copies 2 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_results, replay_steps, stored_steps  # noqa: E402

from nacrith.coder import make_encoder  # noqa: E402
from nacrith.settings import default_threads  # noqa: E402
from nacrith.predictors import EnsembleConfig, EnsemblePredictor  # noqa: E402

_replay: dict = {}  # the rows and schedule, loaded before any copy starts (forked copies share them)


def load(folder: Path, name: str, limit: int) -> int:
    rows, running, symbols, meta = stored_steps(folder, name, limit)
    _replay.update(rows=rows, running=running, symbols=symbols, pieces=list(meta["pieces"]), vocab=rows.shape[1])
    return len(rows)


def code_once() -> int:
    """Bytes coded by one copy of the replay."""
    predictor = EnsemblePredictor(_replay["vocab"], int(_replay["running"][0]), EnsembleConfig(), _replay["pieces"])
    predictor.use_int24_rows(True)  # the fused C step, as the lockstep loop runs it with the int24 coder
    encoder = make_encoder("int24")
    for tokens, probabilities in replay_steps(predictor, _replay["rows"], _replay["running"], _replay["symbols"]):
        encoder.encode(tokens, probabilities)
    return len(encoder.finish())


def in_threads(copies: int) -> list:
    sizes = []
    threads = [threading.Thread(target=lambda: sizes.append(code_once())) for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sizes


def in_processes(copies: int) -> list:
    with multiprocessing.get_context("fork").Pool(copies) as pool:
        return [result.get() for result in [pool.apply_async(code_once) for _ in range(copies)]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--tokens", type=int, default=6100)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    tokens = load(args.dir, args.file, args.tokens)
    code_once()  # imports, first-touch of the rows
    layouts = [("1 thread", in_threads, 1), (f"{args.copies} threads", in_threads, args.copies), (f"{args.copies} processes", in_processes, args.copies)]
    results = []
    for _ in range(args.repeat):
        for label, run, copies in layouts:
            began = time.perf_counter()
            sizes = run(copies)
            wall = time.perf_counter() - began
            results.append({"tag": args.tag, "file": args.file, "layout": label, "cores": default_threads(), "tokens": tokens * copies,
                            "wall_s": round(wall, 3), "tok_s": round(tokens * copies / wall), "sizes": sizes})
            print(json.dumps(results[-1]), flush=True)
            if len(set(sizes)) != 1:
                print("copies coded different sizes", file=sys.stderr)
                return 1
    append_results("ensemble-lanes.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
