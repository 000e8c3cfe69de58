"""Ray against local worker processes: does coding blocks on Ray actors cost time, and how does it scale?

Whole `nacrith` processes on the first ``--bytes`` of FILE in blocks of ``--block-size``:
``--workers N`` locally, then ``--ray local --workers N`` (a Ray instance started by the
process, N actors of one thread), for each N of ``--actors``, compressing and then
decompressing. Checks that every container is byte for byte the local one and restores the
input, and records wall times, the ratio of Ray's time to the local workers' and each
actor's coding rate (the ``ray:`` lines of ``-v``). Writes bench/results/ray-<tag>.json and .md.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, file_parser, machine  # noqa: E402

NACRITH = [sys.executable, "-m", "nacrith.cli"]


def timed(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    began = time.perf_counter()
    done = subprocess.run([*NACRITH, *args], capture_output=True)
    if done.returncode:
        sys.exit(f"nacrith {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
    return time.perf_counter() - began, done


def actor_rate(stderr: bytes) -> float | None:
    found = re.findall(rb"ray: .*?, ([0-9.]+) KB/s per actor", stderr)
    return float(found[0]) if found else None


def main() -> int:
    parser = file_parser(__doc__, "lcet10.txt")
    parser.add_argument("--bytes", type=int, default=40_000)
    parser.add_argument("--block-size", type=int, default=10_000)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor (and local worker) counts")
    args = parser.parse_args()
    rows, identical = [], True
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / args.file.name
        source.write_bytes(args.file.read_bytes()[: args.bytes])
        common = ["-q", "-f", "--block-size", str(args.block_size)]
        for count in (int(part) for part in args.actors.split(",")):
            local_c, _ = timed(["compress", *common, "--workers", str(count), "-o", f"{source}.local.nc", str(source)])
            local_d, _ = timed(["decompress", *common[:2], "--workers", str(count), "-o", f"{source}.local.out", f"{source}.local.nc"])
            ray_c, done = timed(["compress", "-v", *common[1:], "--ray", "local", "--workers", str(count), "-o", f"{source}.ray.nc", str(source)])
            rate = actor_rate(done.stderr)
            ray_d, _ = timed(["decompress", "-f", "--ray", "local", "--workers", str(count), "-o", f"{source}.ray.out", f"{source}.ray.nc"])
            same = Path(f"{source}.local.nc").read_bytes() == Path(f"{source}.ray.nc").read_bytes()
            restored = Path(f"{source}.local.out").read_bytes() == Path(f"{source}.ray.out").read_bytes() == source.read_bytes()
            identical &= same and restored
            rows.append({"workers": count, "local_compress_s": round(local_c, 1), "ray_compress_s": round(ray_c, 1),
                         "compress_ratio": round(ray_c / local_c, 3), "local_decompress_s": round(local_d, 1), "ray_decompress_s": round(ray_d, 1),
                         "decompress_ratio": round(ray_d / local_d, 3), "actor_KB_s": rate, "bytes": Path(f"{source}.ray.nc").stat().st_size,
                         "same_container": same, "restored": restored})
            print(json.dumps(rows[-1]), flush=True)
    command = "python bench/ray_scaling.py " + " ".join(sys.argv[1:])
    result = {"date": datetime.date.today().isoformat(), "command": command, "machine": machine(), "file": args.file.name,
              "input_bytes": min(args.bytes, args.file.stat().st_size), "block_size": args.block_size, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ray-{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Ray against local workers ({result['date']})", "", f"Command: `{command}`", "", f"Machine: {result['machine']}.", "",
             f"{result['input_bytes']} bytes of {args.file.name} in blocks of {args.block_size} bytes; whole processes, Ray started by each. "
             "Local: N processes sharing the cores (one process of every core's thread for N = 1); Ray: N actors of one thread.", "",
             "| workers / actors | local compress s | Ray compress s | Ray / local | local decompress s | Ray decompress s | Ray / local |"
             " per-actor KB/s | bytes | same container | restored |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for row in rows:
        lines.append(f"| {row['workers']} | {row['local_compress_s']} | {row['ray_compress_s']} | {row['compress_ratio']:.2f} | {row['local_decompress_s']}"
                     f" | {row['ray_decompress_s']} | {row['decompress_ratio']:.2f} | {row['actor_KB_s']} | {row['bytes']}"
                     f" | {'yes' if row['same_container'] else 'NO'} | {'yes' if row['restored'] else 'NO'} |")
    (RESULTS / f"ray-{args.tag}.md").write_text("\n".join(lines) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
