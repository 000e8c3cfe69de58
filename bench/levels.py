"""Compression levels: what ``nacrith -1`` ... ``-9`` give on one file.

Compresses FILE (alice29.txt by default) once per level with the default predictor, the
model forced on (no zstd fallback) and the whole file as one block, in one process that
loads the model once; writes ``bench/results/levels-<tag>.md`` and ``.json``. Compression
only: decoding replays the same steps (its time is within about 15% of compression's in
the corpus table).

Usage: python bench/levels.py [FILE] [--levels 1,2,...,9] [--tag cpu] [--gpu]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, file_parser, machine, timed_compress  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.session import Session  # noqa: E402
from nacrith.settings import DEFAULT_LEVEL, LEVELS  # noqa: E402


def measure(data: bytes, level: int, session, gpu: bool) -> dict:
    """One level's compression of ``data``: its layout, size and speed."""
    settings = pipeline.Settings(level=level, fallback=False, gpu=gpu, block_size=max(len(data), 1))
    run = timed_compress(data, settings, session)
    return {"level": level, "streams": settings.streams, "streams_used": sum(run.streams),
            "ctx": settings.ctx, "slide": settings.slide, "min_stream_tokens": settings.min_stream_tokens,
            "bytes": len(run.blob), "bpb": 8 * len(run.blob) / len(data), "seconds": run.seconds, "tok_s": run.tokens / run.seconds,
            "kb_s": len(data) / run.seconds / 1000}


def table(name: str, rows: list[dict], default: dict | None) -> list[str]:
    lines = [f"# Compression levels on {name}", "", f"Machine: {machine()}. Default predictor; the whole file as one block; compression only.", "",
             "| level | streams (used) | ctx | bytes | bits/byte | against the default | s | tokens/s | KB/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        change = "" if default is None or row is default else f"{100 * (row['bytes'] / default['bytes'] - 1):+.1f}%, {row['seconds'] / default['seconds']:.2f}x time"
        mark = " (default)" if row["level"] == DEFAULT_LEVEL else ""
        lines.append(f"| {row['level']}{mark} | {row['streams']} ({row['streams_used']}) | {row['ctx']} | {row['bytes']} | {row['bpb']:.4f} | {change} | "
                     f"{row['seconds']:.1f} | {row['tok_s']:.0f} | {row['kb_s']:.2f} |")
    return lines


def main() -> int:
    parser = file_parser(__doc__, "alice29.txt", gpu=True)
    parser.add_argument("--levels", default=",".join(str(level) for level in sorted(LEVELS)))
    args = parser.parse_args()
    data = args.file.read_bytes()
    session = Session(gpu=args.gpu)
    rows = []
    for level in (int(part) for part in args.levels.split(",")):
        rows.append(measure(data, level, session, args.gpu))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"levels-{args.tag}.json").write_text(json.dumps({"file": args.file.name, "size": len(data), "machine": machine(), "rows": rows}, indent=1))
    default = next((row for row in rows if row["level"] == DEFAULT_LEVEL), None)
    (RESULTS / f"levels-{args.tag}.md").write_text("\n".join(table(args.file.name, rows, default)) + "\n")
    print(f"wrote {RESULTS}/levels-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
