"""Bits per byte of llama.cpp's GPU path against its CPU path at the same settings, same machine.

Both rows use the same engine (llama.cpp unless --engine says otherwise) and the same block
layout: the same streams and the same fewest tokens per stream (--min-stream-tokens, by
default the GPU's 512). Each backend's own defaults differ in the latter (the CPU level's
1024), which alone changes the bits: on 40 KB of bible.txt with the model alone, llama.cpp on
the CPU coded 3775 bytes in 10 streams and 3999 in 20 (+5.9%).

Usage: python bench/cpu_vs_gpu.py FILE [--bytes N] [--streams N] [--min-stream-tokens N] [--llm-only] [--tag NAME]

Writes bench/results/cpu-vs-gpu-NAME.json (NAME: gpu unless given).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, add_settings_arguments, machine, settings_from_arguments  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith import container as fmt  # noqa: E402
from nacrith.settings import DEFAULT_GPU_STREAMS, MIN_GPU_STREAM_TOKENS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--bytes", type=int, default=65536)
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--min-stream-tokens", type=int, default=MIN_GPU_STREAM_TOKENS, help="the same on both backends")
    add_settings_arguments(parser)
    args = parser.parse_args()
    data = args.file.read_bytes()[: args.bytes]
    rows = []
    streams = args.streams or DEFAULT_GPU_STREAMS  # the same on both backends, not each one's default
    for gpu in (False, True):
        settings = settings_from_arguments(args, gpu=gpu, streams=streams, fallback=False, block_size=len(data),
                                           min_stream_tokens=args.min_stream_tokens, engine=args.engine or "llama.cpp")
        packed = io.BytesIO()
        began = time.perf_counter()
        pipeline.compress_stream(io.BytesIO(data), packed, settings)
        seconds = time.perf_counter() - began
        exact = pipeline.decompress(packed.getvalue()) == data
        layout = [len(block.stream_tokens) for block in fmt.parse(packed.getvalue()).blocks]
        rows.append({"backend": settings.backend, "engine": settings.engine, "bytes": len(data), "streams": settings.streams,
                     "min_stream_tokens": settings.min_stream_tokens, "streams_used": layout, "predictor": settings.predictor_name,
                     "compressed": len(packed.getvalue()), "bpb": 8 * len(packed.getvalue()) / len(data), "compress_s": seconds, "exact": exact})
        print(json.dumps(rows[-1]), flush=True)
    difference = rows[1]["bpb"] / rows[0]["bpb"] - 1
    summary = {"file": args.file.name, "rows": rows, "gpu_vs_cpu_bpb": difference, "machine": machine()}
    print(f"GPU bpb vs CPU bpb: {100 * difference:+.2f}%")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu-vs-gpu-{args.tag}.json").write_text(json.dumps(summary, indent=1))
    return 0 if all(row["exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
