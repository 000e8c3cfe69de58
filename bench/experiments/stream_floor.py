"""Small files: the fewest tokens per stream (``min_stream_tokens``) -> bytes and seconds.

A block of T tokens is cut into min(streams, T // min_stream_tokens) lockstep streams, so
the floor decides how many streams a small input gets: fewer streams code better (each
starts cold) and run slower (fewer tokens per llama_decode). Compresses each file once per
floor with the default settings otherwise (the default model, one process) and writes
``bench/results/stream-floor-<tag>.md`` and ``.json``. Decoding takes the stream layout
from the file, so it needs no option.

Usage: python bench/stream_floor.py FILE [FILE ...] [--floors 512,1024,2048] [--tag cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, machine, timed_compress  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.session import Session  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--floors", default="512,1024,2048", help="min_stream_tokens values, comma-separated")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    floors = [int(value) for value in args.floors.split(",")]
    session = Session()
    rows = []
    for path in args.files:
        data = path.read_bytes()
        for floor in floors:
            run = timed_compress(data, pipeline.Settings(min_stream_tokens=floor), session)
            blob, seconds, streams = run.blob, run.seconds, run.streams
            rows.append(dict(file=path.name, bytes=len(data), min_stream_tokens=floor, streams=streams, compressed=len(blob),
                             bpb=8 * len(blob) / len(data), compress_s=seconds))
            print(f"{path.name:14s} floor {floor:5d} streams {streams} -> {len(blob):6d} bytes {rows[-1]['bpb']:.3f} bpb {seconds:.1f} s", flush=True)
    write(rows, args.tag)
    return 0


def write(rows: list[dict], tag: str) -> None:
    lines = [f"# Stream floor ({tag})", "", f"Machine: {machine()}.", "",
             "| file | bytes | min_stream_tokens | streams | compressed | bpb | compress s |", "|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['file']} | {row['bytes']} | {row['min_stream_tokens']} | {row['streams']} | {row['compressed']} | {row['bpb']:.3f} | {row['compress_s']:.1f} |")
    (RESULTS / f"stream-floor-{tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"stream-floor-{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {RESULTS / f'stream-floor-{tag}.md'}")


if __name__ == "__main__":
    sys.exit(main())
