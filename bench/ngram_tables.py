"""The token n-gram tables' update time and memory, alone, over a stored lockstep schedule.

Replays the tokens of a ``bench/hidden_replay.py dump FILE`` in lockstep order (stream by
stream within each step, as the ensemble updates them) through one shared
:class:`nacrith.predictors.ngram.NGramTables` of the default order, and reports the update
time per token and what the tables added to the process's resident memory. Appends to
bench/results/ngram-tables.json. Usage:
    python bench/ngram_tables.py bible.txt.256s.240000b --tag "..."
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, machine, stored_logits  # noqa: E402

from nacrith.predictors import EnsembleConfig  # noqa: E402
from nacrith.predictors.ngram import NGramTables  # noqa: E402


def resident_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    _, meta = stored_logits(args.dir, args.file)
    symbols, running = np.asarray(meta["symbols"]).tolist(), np.asarray(meta["running"]).tolist()
    histories = [[] for _ in range(running[0])]
    tables = NGramTables(EnsembleConfig().max_order)
    before, began, position = resident_mib(), time.perf_counter(), 0
    for n in running:
        for history in histories[:n]:
            token = symbols[position]
            tables.update(history, token)
            history.append(token)
            position += 1
    result = {"tag": args.tag, "machine": machine(), "file": args.file, "tokens": position,
              "us_per_token": round((time.perf_counter() - began) / position * 1e6, 2), "tables_mib": round(resident_mib() - before, 1),
              "contexts": sum(len(table) for table in tables.tables)}
    print(json.dumps(result))
    append_results("ngram-tables.json", [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
