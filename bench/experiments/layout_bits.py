"""Why did llama.cpp's CUDA path code more bits than its CPU path (bench/cpu_vs_gpu.py)?

The two rows used each backend's own floor of tokens per stream (512 on GPUs, 1024 at the
CPU's default level), so the GPU row's block had twice the streams, each starting cold. This
codes the same prefix on the CPU with both floors, for both engines, the model alone, and
records the streams each block got: the layout's share of the difference, with no GPU.

Usage: python bench/experiments/layout_bits.py [FILE] [--bytes 40000] [--streams 256] [--floors 1024,512]
Writes bench/experiments/results/layout-bits-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, machine  # noqa: E402

from nacrith import container as fmt  # noqa: E402
from nacrith import pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "corpora" / "data" / "bible.txt")
    parser.add_argument("--bytes", type=int, default=40_000)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--floors", default="1024,512")
    parser.add_argument("--engines", default="llama.cpp,exact")
    args = parser.parse_args()
    path = args.file
    data = path.read_bytes()[: args.bytes]
    rows = []
    for engine in args.engines.split(","):
        for floor in map(int, args.floors.split(",")):
            began = time.perf_counter()
            blob = pipeline.compress(data, engine=engine, streams=args.streams, min_stream_tokens=floor, ensemble=None, fallback=False,
                                     block_size=len(data), threads=1)
            rows.append({"file": path.name, "bytes": len(data), "engine": engine, "min_stream_tokens": floor,
                         "streams_used": [len(block.stream_tokens) for block in fmt.parse(blob).blocks], "compressed": len(blob),
                         "bpb": 8 * len(blob) / len(data), "seconds": round(time.perf_counter() - began, 1)})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "layout-bits-cpu.json"
    out.write_text(json.dumps({"command": "python bench/experiments/layout_bits.py " + " ".join(sys.argv[1:]), "machine": machine(),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
