"""Raw lockstep decode with several contexts per process ("lanes") against several processes.

Each lane is one thread with its own model and one context of ``--streams`` streams; a
layout ``PxT`` runs P processes of T lanes each, all on the same device. Every lane makes
the engine calls nacrith makes (one token per stream per ``llama_decode``, every logit row
read) for ``--steps`` steps on its own slice of the text, and all lanes start together.
Without MPS, kernels of different processes take turns on a GPU, while kernels of
different contexts in one process may run at the same time: this measures whether lanes
raise the aggregate rate. It also checks that a lane's logits do not depend on the lanes
running beside it (lane 0's first rows hashed, compared with the same lane run alone).

Usage: python bench/lanes.py [FILE] [--gpu] [--streams 256] [--steps 160] [--layouts 1x1,1x2,4x1,...] [--tag NAME]
A layout may name an attention mode: ``1x1:off`` (see nacrith.engine.ATTENTION_MODES).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, file_parser, machine  # noqa: E402

from nacrith.settings import default_threads  # noqa: E402

HASHED_ROWS = 8  # lane 0's first rows, hashed at every step


def run_lane(tokens, ctx: int, gpu: bool, attention, threads: int, barrier, results: list, index: int) -> None:
    """Decode ``tokens`` (streams x steps) in lockstep after every lane is ready."""
    import numpy as np

    from nacrith.session import Session

    try:
        session = Session(None, gpu=gpu, threads=threads)
        context = session.context(tokens.shape[0], ctx, attention)
        context.reset()
        digest = hashlib.sha256()
        n_streams, steps = tokens.shape
        previous = np.full(n_streams, session.llama.bos, np.int32)
        barrier.wait()
        began = time.perf_counter()
        for step in range(steps):
            logits = context.step(previous, np.full(n_streams, step, np.int32))
            logits.max()  # read every logit, as the predictor must
            digest.update(logits[:HASHED_ROWS].tobytes())
            previous = tokens[:, step]
        results[index] = (n_streams * steps, time.perf_counter() - began, digest.hexdigest()[:16])
    except Exception as exc:  # reported by the parent, which must not wait forever
        barrier.abort()
        results[index] = repr(exc)


def run_process(number, token_slices, ctx, gpu, attention, llama_threads, barrier, queue) -> None:
    results: list = [None] * len(token_slices)
    threads = [threading.Thread(target=run_lane, args=(tokens, ctx, gpu, attention, llama_threads, barrier, results, i)) for i, tokens in enumerate(token_slices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put((number, results))


def measure(layout: str, tokens, streams: int, steps: int, ctx: int, gpu: bool) -> dict:
    shape, _, attention = layout.partition(":")
    processes, lanes = (int(part) for part in shape.split("x"))
    spawn = multiprocessing.get_context("spawn")
    barrier, queue = spawn.Barrier(processes * lanes), spawn.Queue()
    per_lane = streams * steps
    slices = [[tokens[(p * lanes + t) * per_lane:(p * lanes + t + 1) * per_lane].reshape(streams, steps) for t in range(lanes)] for p in range(processes)]
    workers = [spawn.Process(target=run_process, args=(p, slices[p], ctx, gpu, attention or None, max(1, default_threads() // (processes * lanes)), barrier, queue)) for p in range(processes)]
    for worker in workers:
        worker.start()
    finished = []
    while len(finished) < processes:
        try:
            finished.append(queue.get(timeout=2))
        except Exception:  # queue.Empty: a process that died (a crash in llama.cpp) reports nothing
            if any(worker.exitcode not in (None, 0) for worker in workers):
                for worker in workers:
                    worker.kill()
                return {"layout": layout, "error": f"a process died (exit codes {[worker.exitcode for worker in workers]})"}
    for worker in workers:
        worker.join()
    results = [lane for _, lanes_of_process in sorted(finished) for lane in lanes_of_process]
    failed = [lane for lane in results if not isinstance(lane, tuple)]
    if failed:
        return {"layout": layout, "error": failed[0]}
    total = sum(n for n, _, _ in results)
    slowest = max(seconds for _, seconds, _ in results)
    return {"layout": layout, "processes": processes, "lanes": lanes, "streams": streams, "steps": steps, "tokens": total, "tok_s": total / slowest, "lane0_sha": results[0][2]}


def main() -> int:
    parser = file_parser(__doc__, "bible.txt", gpu=True)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--layouts", default="1x1,1x2,1x4,2x2,4x1,4x2,8x1")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    most_lanes = max(int(p) * int(t) for p, t in (layout.partition(":")[0].split("x") for layout in layouts))

    import numpy as np

    from nacrith.session import Session

    needed = most_lanes * args.streams * args.steps
    tokenizer = Session(None).tokenizer
    text = args.file.read_bytes()
    tokens = np.asarray(tokenizer.encode(text[: 5 * needed]), np.int32)
    if len(tokens) < needed:
        raise SystemExit(f"{args.file} has fewer than {needed} tokens")
    rows: list = []
    for layout in layouts:
        row = measure(layout, tokens, args.streams, args.steps, args.ctx, args.gpu)
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(rows, args)  # after each layout: a later crash or timeout keeps what was measured
    return 0


def save(rows: list, args) -> None:
    """Write the rows, each with whether lane 0's logits equal those of the same lane alone."""
    alone = {row["layout"].partition(":")[2]: row.get("lane0_sha") for row in rows if row.get("lanes") == 1 and row.get("processes") == 1}
    for row in rows:
        if "lane0_sha" in row and row["layout"].partition(":")[2] in alone:
            row["lane0_same_as_alone"] = row["lane0_sha"] == alone[row["layout"].partition(":")[2]]
    result = {"file": args.file.name, "backend": "cuda" if args.gpu else "cpu", "ctx": args.ctx, "machine": machine(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"lanes-{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
