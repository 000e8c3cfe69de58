"""Corpus table: nacrith against gzip -9, bzip2 -9, xz -9e, zstd -19 and zstd -19 --long.

For each file: nacrith's compressed size and bits per byte, compress and decompress wall
time, tokens per second, a byte-exact check, and the classical tools' sizes. Results go to
``bench/results/corpus-<tag>.md`` and ``.json``.

Usage:
    python bench/corpus.py --all                 # every file of corpora/manifest.tsv (but the large ones)
    python bench/corpus.py FILE [FILE ...]       # any files (enwik8 when you have it)
    options: --tag NAME, --streams N, --ctx N, --slide N, --workers N, ... (see --help)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, RESULTS, add_settings_arguments, machine, round_trip, settings_from_arguments  # noqa: E402

from nacrith import container as fmt  # noqa: E402
from nacrith import pipeline  # noqa: E402

CANTERBURY = ["alice29.txt", "asyoulik.txt", "cp.html", "fields.c", "grammar.lsp", "kennedy.xls", "lcet10.txt", "plrabn12.txt", "ptt5", "sum", "xargs.1"]
CLASSICAL = {
    "gzip -9": ["gzip", "-9", "-c"],
    "bzip2 -9": ["bzip2", "-9", "-c"],
    "xz -9e": ["xz", "-9e", "-c"],
    "zstd -19": ["zstd", "-19", "-c", "-q"],
    "zstd -19 --long": ["zstd", "-19", "--long", "-c", "-q"],
}


def classical_size(command: list[str], data: bytes) -> int | None:
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, input=data, capture_output=True, check=True)
    return len(result.stdout)


def measure(path: Path, settings: pipeline.Settings, workers, nbytes: int | None = None, ray: str | None = None) -> dict:
    """Compress and decompress ``path`` (its first ``nbytes``) through the pipeline (model
    loading included; on Ray actors with ``ray``)."""
    with open(path, "rb") as source:
        data = source.read(nbytes if nbytes else -1)
    trip = round_trip(data, settings, workers, ray)
    row = {
        "file": path.name if not nbytes else f"{path.name}, first {len(data)} B",
        "size": len(data),
        "nacrith": len(trip.blob),
        "bpb": 8 * len(trip.blob) / len(data) if data else 0.0,
        "exact": trip.exact,
        "compress_s": trip.compress_s,
        "decompress_s": trip.decompress_s,
        "tokens": trip.tokens,
        "compress_tok_s": trip.compress_tok_s,
        "decompress_tok_s": trip.decompress_tok_s,
        "block_kinds": sorted(fmt.BLOCK_KINDS[block.kind] for block in fmt.parse(trip.blob).blocks),
    }
    for name, command in CLASSICAL.items():
        row[name] = classical_size(command, data)
    return row


def markdown(rows: list[dict], title: str, settings: pipeline.Settings, workers) -> str:
    lines = [
        f"# {title}",
        "",
        f"Settings: streams {settings.streams}, ctx {settings.ctx}, slide {settings.slide}, block {settings.block_size} B, workers {workers}, predictor {settings.predictor_name}.",
        f"Machine: {machine()}.",
        "",
        "| file | bytes | nacrith | bpb | " + " | ".join(f"{name} (bpb)" for name in CLASSICAL) + " | compress s | decompress s | tok/s c/d | exact |",
        "|---|---:|---:|---:|" + "---:|" * len(CLASSICAL) + "---:|---:|---:|:-:|",
    ]
    for row in rows:
        classical = " | ".join("–" if row[name] is None else f"{row[name]} ({8 * row[name] / row['size']:.3f})" for name in CLASSICAL)
        lines.append(
            f"| {row['file']} | {row['size']} | {row['nacrith']} | {row['bpb']:.3f} | {classical} | "
            f"{row['compress_s']:.1f} | {row['decompress_s']:.1f} | {row['compress_tok_s']:.0f}/{row['decompress_tok_s']:.0f} | {'yes' if row['exact'] else 'NO'} |"
        )
    total = sum(row["size"] for row in rows)
    packed = sum(row["nacrith"] for row in rows)
    if total:
        lines.append(f"| **total** | {total} | {packed} | {8 * packed / total:.3f} | " + " | ".join(
            "–" if any(row[name] is None for row in rows) else f"{sum(row[name] for row in rows)} ({8 * sum(row[name] for row in rows) / total:.3f})" for name in CLASSICAL
        ) + f" | {sum(r['compress_s'] for r in rows):.1f} | {sum(r['decompress_s'] for r in rows):.1f} | | {'yes' if all(r['exact'] for r in rows) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help="every Canterbury file from corpora/data")
    parser.add_argument("--tag", default="canterbury")
    parser.add_argument("--workers", default="1", help="worker processes, or with --ray the actors (default: one per cluster CPU)")
    parser.add_argument("--bytes", type=int, default=None, help="only the first N bytes of each file (enwik8 and enwik9 on a small machine)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS|local|auto", help="code the blocks on a Ray cluster's actors (nacrith --ray)")
    add_settings_arguments(parser)
    args = parser.parse_args()
    files = list(args.files)
    if args.all:
        files += [HERE.parent / "corpora" / "data" / name for name in CANTERBURY]
    if not files:
        parser.error("name files or --all")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        parser.error(f"missing: {', '.join(missing)} (run `make corpora`)")
    settings = settings_from_arguments(args)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    rows = []
    for path in files:
        row = measure(path, settings, workers, args.bytes, args.ray)
        rows.append(row)
        print(f"{row['file']:>14} {row['size']:>9} -> {row['nacrith']:>8} {row['bpb']:.3f} bpb  "
              f"zstd {row['zstd -19 --long']}  c {row['compress_s']:.1f}s d {row['decompress_s']:.1f}s  exact {row['exact']}", flush=True)
        write_results(args.tag, rows, settings, workers)  # after every file: a run of hours stopped early keeps what it measured
    print(f"wrote {RESULTS}/corpus-{args.tag}.md")
    return 0 if all(row["exact"] for row in rows) else 1


def write_results(tag: str, rows: list[dict], settings: pipeline.Settings, workers) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"corpus-{tag}.md").write_text(markdown(rows, f"Corpus benchmark ({tag})", settings, workers))
    (RESULTS / f"corpus-{tag}.json").write_text(json.dumps({"settings": settings.describe(), "workers": workers, "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
