"""Trade-off table: streams x context length -> bits per byte and tokens/s.

Compresses one file (alice29.txt by default) once per combination with the default
predictor, the model forced on (no zstd fallback), slide = ctx/4, and writes
``bench/results/tradeoff-<tag>.md`` and ``.json``. The defaults in nacrith/pipeline.py
are chosen from this table.

A pair may name an attention mode (``16x1024:off``, see nacrith.engine.ATTENTION_MODES;
else the backend's default). The model is $NACRITH_MODEL's (a file or a zoo name) or the
default.

Usage: python bench/tradeoff.py [FILE] [--pairs 4x1024,16x512:off,...] [--tag cpu] [--gpu]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, file_parser, machine, timed_compress  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.session import Session  # noqa: E402


def main() -> int:
    parser = file_parser(__doc__, "alice29.txt", gpu=True)
    parser.add_argument("--pairs", default="16x512,16x1024,16x2048,4x1024,64x1024", help="STREAMSxCTX[:ATTENTION],...")
    args = parser.parse_args()
    data = args.file.read_bytes()
    session = Session(gpu=args.gpu)
    rows = []
    for pair in args.pairs.split(","):
        layout, _, attention = pair.partition(":")
        streams, ctx = (int(x) for x in layout.split("x"))
        settings = pipeline.Settings(streams=streams, ctx=ctx, slide=ctx // 4, fallback=False, gpu=args.gpu, block_size=max(len(data), 1),
                                     attention=attention or None)
        run = timed_compress(data, settings, session)
        row = {"streams": streams, "streams_used": run.streams[0], "ctx": ctx, "slide": ctx // 4, "attention": attention or "default",
               "model": session.info.name,
               "bytes": len(run.blob), "bpb": 8 * len(run.blob) / len(data), "seconds": run.seconds, "tok_s": run.tokens / run.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"tradeoff-{args.tag}.json").write_text(json.dumps({"file": args.file.name, "machine": machine(), "rows": rows}, indent=1))
    streams_list = sorted({r["streams"] for r in rows})
    lines = [f"# Trade-off on {args.file.name}: streams x context", "", f"Machine: {machine()}. Predictor: default ensemble; slide = ctx/4; compression only.", "",
             "bits per byte / tokens per second:", "", "| ctx \\\\ streams | " + " | ".join(str(s) for s in streams_list) + " |", "|---|" + "---:|" * len(streams_list)]
    for ctx in sorted({r["ctx"] for r in rows}):
        cells = []
        for streams in streams_list:
            row = next((r for r in rows if r["ctx"] == ctx and r["streams"] == streams), None)
            cells.append("–" if row is None else f"{row['bpb']:.4f} / {row['tok_s']:.0f}")
        lines.append(f"| {ctx} | " + " | ".join(cells) + " |")
    lines += ["", "Every run (the table above shows the first of a layout):", "",
              "| streams (used) | ctx | attention | model | bytes | bits/byte | s | tokens/s |", "|---:|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} ({r['streams_used']}) | {r['ctx']} | {r['attention']} | {r['model']} | {r['bytes']} | {r['bpb']:.4f} | "
              f"{r['seconds']:.1f} | {r['tok_s']:.0f} |" for r in rows]
    (RESULTS / f"tradeoff-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}/tradeoff-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
