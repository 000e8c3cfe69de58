"""The bias tables' learning rule: preset v3's fixed-rate steps against AdaGrad settings.

Replays the logits that ``bench/hidden_replay.py dump FILE`` stored (the default lockstep
schedule) through the ensemble with each setting and reports the ideal code length in bits
per byte (what the range coder gets to within a few bytes). Every setting is a preset
with some fields changed, computed by nacrith's own code (C kernel where built). Results
are appended to bench/results/bias-rule.json. Usage:
    python bench/hidden_replay.py dump alice29.txt; python bench/hidden_replay.py dump asyoulik.txt
    python bench/bias_rule.py alice29.txt asyoulik.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

from nacrith.predictors import EnsemblePredictor  # noqa: E402
from nacrith.predictors.ensemble import PRESETS  # noqa: E402

SETTINGS = [
    ("v3 (sgd, lr 0.16 both tables)", "v3", {}),
    ("v4 (adagrad, lr 0.5 / 0.3, eps 1)", "v4", {}),
    ("adagrad, lr 0.5 both tables", "v4", {"context_bias_lr": 0.5}),
    ("adagrad, lr 0.3 both tables", "v4", {"bias_lr": 0.3}),
    ("adagrad, lr 1.0 both tables", "v4", {"bias_lr": 1.0, "context_bias_lr": 1.0}),
    ("adagrad, lr 0.5 / 0.2", "v4", {"context_bias_lr": 0.2}),
    ("adagrad, lr 0.5 / 0.8", "v4", {"context_bias_lr": 0.8}),
    ("adagrad, lr 0.7 / 0.3", "v4", {"bias_lr": 0.7}),
    ("adagrad, lr 0.4 / 0.25, eps 0.5", "v4", {"bias_lr": 0.4, "context_bias_lr": 0.25, "bias_eps": 0.5}),
    ("adagrad, lr 0.7 / 0.4, eps 2", "v4", {"bias_lr": 0.7, "context_bias_lr": 0.4, "bias_eps": 2.0}),
]


def ideal_bits_per_byte(folder: Path, name: str, config) -> float:
    logits = np.load(folder / f"{name}.logits.npy", mmap_mode="r")
    meta = np.load(folder / f"{name}.meta.npz", allow_pickle=True)
    running, symbols = meta["running"], meta["symbols"]
    predictor = EnsemblePredictor(logits.shape[1], int(running[0]), config, list(meta["pieces"]))
    bits, row = 0.0, 0
    for n in map(int, running):
        rows, tokens = np.array(logits[row:row + n]), symbols[row:row + n]
        want = predictor.want_logits(n)
        probabilities = predictor.probabilities(rows if want is None else np.ascontiguousarray(rows[want.astype(bool)]), n)
        bits -= np.log2(probabilities[np.arange(n), tokens] / probabilities.sum(axis=1)).sum()
        predictor.update(tokens)
        row += n
    return bits / int(meta["nbytes"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    args = parser.parse_args()
    rows = []
    for label, preset, changes in SETTINGS:
        for name in args.files:
            bpb = ideal_bits_per_byte(args.dir, name, replace(PRESETS[preset], **changes))
            rows.append({"file": name, "setting": label, "preset": preset, "changes": changes, "bpb": bpb})
            print(json.dumps(rows[-1]), flush=True)
    path = RESULTS / "bias-rule.json"
    previous = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(previous + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
