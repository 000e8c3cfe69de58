"""Peak memory (maximum resident set size) of whole `nacrith` processes.

Two measurements, each a fresh `python -m nacrith.cli` process timed with getrusage:

* a large input (default 100 MB of random bytes, generated on the fly and piped through
  stdin): the parent's streaming path, block by block; its peak must not grow with the
  input size;
* a text input (default: 200 KB of bible.txt) that the model codes: model, context (KV
  cache), predictor tables and the block buffers.

With the default one worker on a small CPU the coding runs inside that process, so its
peak is the whole job's. Usage:
    python bench/memory.py [--random-mb 100] [--text FILE] [--text-bytes 200000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine  # noqa: E402


def peak_of(command: list[str], feed) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``command`` fed by ``feed(pipe)``, in a fresh process."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as sink:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=sink)
        feed(process.stdin)
        process.stdin.close()
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak (KiB); worker processes are not counted
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - began


def random_feed(megabytes: int):
    def feed(pipe):
        for _ in range(megabytes):
            pipe.write(os.urandom(1 << 20))
    return feed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-mb", type=int, default=100)
    parser.add_argument("--text", type=Path, default=ROOT / "corpora" / "data" / "bible.txt")
    parser.add_argument("--text-bytes", type=int, default=200_000)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    command = [sys.executable, "-m", "nacrith.cli", "compress", "-q", "-c", "-"]
    rows = []
    text = args.text.read_bytes()[: args.text_bytes]
    peak, seconds = peak_of(command, lambda pipe: pipe.write(text))
    rows.append({"input": f"{args.text.name}, first {len(text)} B (model coded)", "bytes": len(text), "peak_mib": peak, "seconds": seconds})
    print(json.dumps(rows[-1]), flush=True)
    peak, seconds = peak_of(command, random_feed(args.random_mb))
    rows.append({"input": f"{args.random_mb} MiB of random bytes (stdin)", "bytes": args.random_mb << 20, "peak_mib": peak, "seconds": seconds})
    print(json.dumps(rows[-1]), flush=True)
    lines = ["# Peak memory", "", f"`nacrith compress -c -` in a fresh process, default settings. Machine: {machine()}.", "",
             "| input | bytes | peak RSS MiB | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {row['input']} | {row['bytes']} | {row['peak_mib']:.0f} | {row['seconds']:.1f} |" for row in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"memory-{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"memory-{args.tag}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print(f"wrote {RESULTS}/memory-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
