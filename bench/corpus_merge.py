"""One corpus table from several ``bench/corpus.py`` result files (later files win per file).

Used when one table is measured in several runs (the small files in one, the rest in another).
Usage: python bench/corpus_merge.py bench/results/corpus-canterbury.json bench/results/corpus-canterbury-binary.json
"""
from __future__ import annotations

import json
import sys

COLUMNS = ["gzip -9", "bzip2 -9", "xz -9e", "zstd -19 --long"]


def main(paths: list[str]) -> int:
    rows: dict[str, dict] = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            rows[row["file"]] = row
    table = sorted(rows.values(), key=lambda row: row["file"].lower())
    print("| file | bytes | nacrith | " + " | ".join(COLUMNS) + " | compress s | decompress s | exact |")
    print("|---|---:|---:|" + "---:|" * len(COLUMNS) + "---:|---:|:-:|")
    for row in table:
        others = " | ".join(f"{row[name]} ({8 * row[name] / row['size']:.3f})" for name in COLUMNS)
        print(f"| {row['file']} | {row['size']} | **{row['nacrith']} ({row['bpb']:.3f})** | {others} | "
              f"{row['compress_s']:.1f} | {row['decompress_s']:.1f} | {'yes' if row['exact'] else 'NO'} |")
    total = sum(row["size"] for row in table)
    packed = sum(row["nacrith"] for row in table)
    others = " | ".join(f"{sum(row[name] for row in table)} ({8 * sum(row[name] for row in table) / total:.3f})" for name in COLUMNS)
    print(f"| total | {total} | **{packed} ({8 * packed / total:.3f})** | {others} | "
          f"{sum(row['compress_s'] for row in table):.0f} | {sum(row['decompress_s'] for row in table):.0f} | "
          f"{'yes' if all(row['exact'] for row in table) else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
