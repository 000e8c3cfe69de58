"""The token n-gram tables' and the match index's update time and memory, alone, over a
stored lockstep schedule.

Replays the tokens of a ``bench/experiments/hidden_replay.py dump FILE`` in lockstep order (stream by
stream within each step, as the ensemble updates them) through one shared
:class:`nacrith.predictors.ngram.NGramTables` of the default order, then through one shared
:class:`nacrith.predictors.match.MatchIndex` with a :class:`~nacrith.predictors.match.MatchState`
per stream, and reports each one's update time per token and what it added to the process's
resident memory. Appends to bench/results/ngram-tables.json. Usage:
    python bench/ngram_tables.py bible.txt.256s.240000b --tag "..."
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_results, machine, stored_logits  # noqa: E402

from nacrith.predictors import EnsembleConfig  # noqa: E402
from nacrith.predictors.match import MatchIndex, MatchState  # noqa: E402
from nacrith.predictors.ngram import NGramTables  # noqa: E402


def resident_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ngram_updates(symbols: list, running: list) -> dict:
    """The n-gram tables' updates over the schedule: time per token, memory added, contexts."""
    histories = [[] for _ in range(running[0])]
    tables = NGramTables(EnsembleConfig().max_order)
    before, began, position = resident_mib(), time.perf_counter(), 0
    for n in running:
        for history in histories[:n]:
            token = symbols[position]
            tables.update(history, token)
            history.append(token)
            position += 1
    return {"tokens": position, "us_per_token": round((time.perf_counter() - began) / position * 1e6, 2),
            "tables_mib": round(resident_mib() - before, 1), "contexts": sum(len(table) for table in tables.tables)}


def match_updates(symbols: list, running: list) -> dict:
    """The match index's updates over the schedule: time per token, memory added, entries."""
    histories = [[] for _ in range(running[0])]
    index = MatchIndex(EnsembleConfig().match_min)
    states = [MatchState(index, history) for history in histories]
    before, began, position = resident_mib(), time.perf_counter(), 0
    for n in running:
        for history, state in zip(histories[:n], states):
            token = symbols[position]
            history.append(token)
            state.update(token)
            position += 1
    return {"match_us_per_token": round((time.perf_counter() - began) / position * 1e6, 2),
            "match_mib": round(resident_mib() - before, 1), "match_entries": len(index.last_seen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    _, meta = stored_logits(args.dir, args.file)
    symbols, running = np.asarray(meta["symbols"]).tolist(), np.asarray(meta["running"]).tolist()
    result = {"tag": args.tag, "machine": machine(), "file": args.file}
    # each in a forked process of its own, so that neither reuses memory the other freed
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result.update(pool.apply(ngram_updates, (symbols, running)))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result.update(pool.apply(match_updates, (symbols, running)))
    print(json.dumps(result))
    append_results("ngram-tables.json", [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
