"""A busy machine: how much slower does compression get when other processes keep every core busy?

Compresses the first ``--bytes`` of a file with each engine in a fresh process, alone and
then beside ``--load`` busy processes (default: one per core, each a tight Python loop),
and records the wall time and the CPU time nacrith used. A program that shares the cores
fairly takes about (its threads + the load) / cores times as long, and no more CPU time;
one whose threads spin while they wait burns its share waiting for descheduled partners.

Usage: python bench/loaded.py [FILE] [--bytes 20000] [--engines exact,llama.cpp] [--load N] [--tag cpu]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine  # noqa: E402


def busy(stop) -> None:
    while not stop.is_set():
        for _ in range(100000):
            pass


def timed(path: Path, nbytes: int, engine: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in"
        source.write_bytes(path.read_bytes()[:nbytes])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "nacrith.cli", "compress", "--engine", engine, "-q", "-f", str(source)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode(errors="replace"))
        size = (Path(folder) / "in.nc").stat().st_size
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "corpora" / "data" / "alice29.txt")
    parser.add_argument("--bytes", type=int, default=20000)
    parser.add_argument("--engines", default="exact,llama.cpp")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    rows = []
    for engine in args.engines.split(","):
        timed(args.file, 2000, engine)  # caches warm (model file, converted weights)
        alone = timed(args.file, args.bytes, engine)
        stop = multiprocessing.Event()
        workers = [multiprocessing.Process(target=busy, args=(stop,)) for _ in range(args.load)]
        for worker in workers:
            worker.start()
        try:
            loaded = timed(args.file, args.bytes, engine)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        row = {"engine": engine, "alone": alone, "loaded": loaded, "wall_ratio": round(loaded["wall_s"] / alone["wall_s"], 2),
               "cpu_ratio": round(loaded["cpu_s"] / alone["cpu_s"], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/loaded.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "file": args.file.name, "bytes": args.bytes, "load_processes": args.load, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"loaded-{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
