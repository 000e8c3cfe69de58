"""The bias tables' learning rule: preset v3's fixed-rate steps against AdaGrad settings.

Replays the logits that ``bench/experiments/hidden_replay.py dump FILE`` stored (the default lockstep
schedule) through the ensemble with each setting and reports the ideal code length in bits
per byte (what the range coder gets to within a few bytes). Every setting is a preset
with some fields changed, computed by nacrith's own code (C kernel where built). Results
are appended to bench/results/bias-rule.json. Usage:
    python bench/experiments/hidden_replay.py dump alice29.txt; python bench/experiments/hidden_replay.py dump asyoulik.txt
    python bench/bias_rule.py alice29.txt asyoulik.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_results, replay_steps, stored_logits  # noqa: E402

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
    logits, meta = stored_logits(folder, name)
    predictor = EnsemblePredictor(logits.shape[1], int(meta["running"][0]), config, list(meta["pieces"]))
    bits = 0.0
    for tokens, probabilities in replay_steps(predictor, logits, meta["running"], meta["symbols"]):
        bits -= np.log2(probabilities[np.arange(len(tokens)), tokens] / probabilities.sum(axis=1)).sum()
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
    append_results("bias-rule.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
