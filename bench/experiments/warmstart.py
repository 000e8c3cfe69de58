"""Probe: would the ensemble gain from a learned state shipped with the model (a prior)?

The bias heads, the temperature and the mixer weights all start from zero (or their
initial values) in every block. If part of what they learn were the same for every text
(a miscalibration of the quantised model, say), a state learned once on other text could
be shipped with nacrith as their starting point. This replays the logits that
``bench/experiments/hidden_replay.py dump`` stored for two corpus files (ideal code length, default
ensemble): the ensemble runs over SOURCE, and its final (or its step-averaged) state
starts the run over TARGET.

With SOURCE equal to TARGET the result is an upper bound that no shipped prior could
reach (the state has seen the text it codes). Results are appended to
bench/results/warmstart.json. Usage:
    python bench/experiments/hidden_replay.py dump alice29.txt; python bench/experiments/hidden_replay.py dump asyoulik.txt
    python bench/warmstart.py alice29.txt asyoulik.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_results, replay_steps, stored_logits  # noqa: E402

from nacrith.predictors import EnsembleConfig, EnsemblePredictor  # noqa: E402

ALL_PARTS = ("bias", "context", "temperature", "weights")


def replay(folder: Path, name: str, start: dict | None = None, parts=ALL_PARTS, average: bool = False) -> tuple[float, dict]:
    """Bits per byte of the default ensemble over a stored file, and its learned state at
    the end (``average``: the bias tables averaged over the steps instead)."""
    logits, meta = stored_logits(folder, name)
    predictor = EnsemblePredictor(logits.shape[1], int(meta["running"][0]), EnsembleConfig(), list(meta["pieces"]))
    if start is not None:
        if "bias" in parts:
            predictor.bias[:] = start["bias"]
        if "context" in parts:
            predictor.context_bias[:] = start["context"]
        if "temperature" in parts:
            predictor.temperature = start["temperature"]
        if "weights" in parts:
            predictor.weights[:] = start["weights"]
    bias_sum, context_sum = np.zeros_like(predictor.bias), np.zeros_like(predictor.context_bias)
    bits, steps = 0.0, 0
    for tokens, probabilities in replay_steps(predictor, logits, meta["running"], meta["symbols"]):
        bits -= np.log2(probabilities[np.arange(len(tokens)), tokens] / probabilities.sum(axis=1)).sum()
        if average and steps:  # the state after the previous step's update
            bias_sum += predictor.bias
            context_sum += predictor.context_bias
        steps += 1
    if average:  # and after the last one
        bias_sum += predictor.bias
        context_sum += predictor.context_bias
    state = {"bias": bias_sum / steps if average else predictor.bias.copy(),
             "context": context_sum / steps if average else predictor.context_bias.copy(),
             "temperature": predictor.temperature,
             "weights": predictor.weights.mean(axis=0)}  # every stream starts from the streams' mean
    return bits / int(meta["nbytes"]), state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    args = parser.parse_args()
    cold, _ = replay(args.dir, args.target)
    rows = [{"source": None, "target": args.target, "start": "cold (default)", "bpb": cold}]
    print(json.dumps(rows[0]), flush=True)
    final = replay(args.dir, args.source)[1]
    averaged = replay(args.dir, args.source, average=True)[1]
    trials = [("final state", final, ALL_PARTS), ("final bias tables", final, ("bias",)),
              ("final bias tables + temperature", final, ("bias", "temperature")), ("final mixer weights", final, ("weights",)),
              ("averaged state", averaged, ALL_PARTS), ("averaged bias tables + temperature", averaged, ("bias", "temperature"))]
    for label, state, parts in trials:
        bpb, _ = replay(args.dir, args.target, state, parts)
        rows.append({"source": args.source, "target": args.target, "start": label, "bpb": bpb, "vs cold": f"{(bpb / cold - 1) * 100:+.2f}%"})
        print(json.dumps(rows[-1]), flush=True)
    append_results("warmstart.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
