"""Worker processes on the CPU: the same input compressed and decompressed with --workers 1, 2, auto (or PxL lanes).

The container must be byte-identical whatever the worker count; the table gives wall
times and tokens/s. Usage: python bench/workers.py [FILE] [--bytes N] [--block-size N] [--workers 1,2,auto]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, file_parser, machine, round_trip  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.workers import plan_workers  # noqa: E402


def main() -> int:
    parser = file_parser(__doc__, "lcet10.txt")
    parser.add_argument("--bytes", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=50_000)
    parser.add_argument("--workers", default="1,2,auto")
    args = parser.parse_args()
    data = args.file.read_bytes()[: args.bytes]
    settings = pipeline.Settings(block_size=args.block_size, fallback=False)
    rows, containers = [], set()
    for workers in args.workers.split(","):
        workers = workers if workers == "auto" or "x" in workers else int(workers)
        plan = plan_workers(workers, False, settings.streams, settings.ctx, blocks=-(-len(data) // args.block_size))
        trip = round_trip(data, settings, workers)
        containers.add(trip.blob)
        rows.append({"workers": workers, "processes": plan.processes, "lanes": plan.lanes, "threads_each": plan.threads, "compress_s": trip.compress_s, "decompress_s": trip.decompress_s,
                     "compress_tok_s": trip.compress_tok_s, "decompress_tok_s": trip.decompress_tok_s, "bytes": len(trip.blob), "exact": trip.exact})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"file": args.file.name, "input_bytes": len(data), "block_size": args.block_size, "identical_containers": len(containers) == 1, "machine": machine(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"workers-{args.tag}.json").write_text(json.dumps(summary, indent=1))
    print("identical containers:", len(containers) == 1)
    return 0 if len(containers) == 1 and all(row["exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
