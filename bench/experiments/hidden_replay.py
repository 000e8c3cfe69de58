"""Probe: can the model's final hidden state improve the ensemble? (replay, ideal code length)

``dump FILE`` runs the default lockstep schedule (streams, window, slides) over a corpus
file once (``--streams N`` and ``--bytes B``: N streams over its first B bytes, stored as
``FILE.Ns.Bb``, the name the other actions then take) and stores every step's logits (float32, 8 GB for asyoulik.txt), the model's
final hidden state beside them (llama.cpp returns it with ``llama_set_embeddings``; the
logits stay bit-identical, which the dump checks on its first step) and the true tokens.

``replay FILE --mode ...`` feeds the stored rows to the default ensemble after adding a
correction computed from the hidden state ``h``, learned online by one gradient step of
the code length per token (``-lr * (p - onehot)``, the bias head's rule), and reports the
ideal code length in bits per byte:

* ``none``: the ensemble alone (``--llm``: the model alone);
* ``lsh``: one bias table per bucket of a locality-sensitive hash of ``h`` (the signs of
  ``r`` random projections; ``r`` 0 is one global table, a slower second bias head);
* ``linear``: ``logits += (h @ U) @ W``, ``U`` a fixed random ``r``-column projection and
  ``W`` learned.
* ``rows``: full-rank online adaptation of the output layer, kept sparse: ``logits[t] +=
  D[t] . (h - m)``, ``m`` the mean of the hidden states of the earlier steps; after each
  token only the rows of the token and of the ``--top`` most probable tokens learn,
  ``D[t] -= lr * g[t] * (h - m) / |h - m|^2`` (a step of ``lr * g[t]`` in that token's logit
  in the same context: the bias head's step, moved into the space the model predicts from).
* ``argmax``: one more bias table per bucket of a hash of the model's most probable token
  (``--r`` tables), learned by the v4 tables' AdaGrad step (rate ``--lr``, eps 1): a
  correction of what the model confuses ("when it expects X, the text has Y").

``code FILE --preset v2`` codes the stored rows with an ensemble preset and the int24 coder
and prints the coded size and hashes of the coded bytes and of the mixer weights: run it
with and without ``NPY_DISABLE_CPU_FEATURES`` to see whether a preset's state depends on
numpy's SIMD code (see README, "How it works").

Results are appended to bench/results/hidden-replay.json. Usage:
    python bench/experiments/hidden_replay.py dump asyoulik.txt [--dir /tmp/nacrith-replay]
    python bench/hidden_replay.py replay asyoulik.txt --mode linear --r 16 --lr 0.002
    python bench/hidden_replay.py replay asyoulik.txt --mode rows --top 8 --lr 0.05
    python bench/hidden_replay.py replay asyoulik.txt --mode argmax --r 256 --lr 0.3
    python bench/hidden_replay.py code asyoulik.txt --preset v4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, append_results, replay_steps, stored_logits  # noqa: E402

import llama_cpp as L  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.coder import make_encoder  # noqa: E402
from nacrith.lockstep import Lockstep  # noqa: E402
from nacrith.predictors import EnsembleConfig, EnsemblePredictor, LLMPredictor  # noqa: E402
from nacrith.predictors.ensemble import DEFAULT_PRESET, PRESETS  # noqa: E402
from nacrith.session import Session  # noqa: E402

DATA = ROOT / "corpora" / "data"


class Recorder:
    """A model-only predictor that stores each step's logits, hidden states and tokens."""

    def __init__(self, context, n_streams: int, logits_out: np.ndarray, hidden_out: np.ndarray, symbols_out: np.ndarray):
        self.context, self.logits_out, self.hidden_out, self.symbols_out = context, logits_out, hidden_out, symbols_out
        self.inner = LLMPredictor(logits_out.shape[1], n_streams)
        self.row = 0
        self.running: list[int] = []

    def want_logits(self, running):
        return None

    def probabilities(self, logits, running):
        stop = self.row + running
        self.logits_out[self.row:stop] = logits
        hidden = L.llama_get_embeddings(self.context.handle)
        self.hidden_out[self.row:stop] = np.ctypeslib.as_array(hidden, shape=(running, self.hidden_out.shape[1]))
        self.running.append(running)
        return self.inner.probabilities(logits, running)

    def update(self, symbols):
        n = self.running[-1]
        self.symbols_out[self.row:self.row + n] = symbols[:n]
        self.row += n


def stored_name(name: str, streams: int | None, nbytes: int | None) -> str:
    """The name a dump is stored under: the file's, or with its stream count and prefix length."""
    return name + (f".{streams}s" if streams else "") + (f".{nbytes}b" if nbytes else "")


def dump(name: str, folder: Path, n_streams: int | None = None, nbytes: int | None = None) -> None:
    data = (DATA / name).read_bytes()[:nbytes]
    settings = pipeline.Settings() if n_streams is None else pipeline.Settings(streams=n_streams)
    name = stored_name(name, n_streams, nbytes)
    session = Session()
    tokens = pipeline.text_tokens(data, session.tokenizer)
    streams = pipeline.lockstep_streams(tokens, settings)
    n_embd = L.llama_model_n_embd(session.llama.handle)
    context = session.context(len(streams), settings.ctx)
    plain = np.array(context.step(np.full(len(streams), session.llama.bos, np.int32), np.zeros(len(streams), np.int32)))
    L.llama_set_embeddings(context.handle, True)
    context.reset()
    with_hidden = context.step(np.full(len(streams), session.llama.bos, np.int32), np.zeros(len(streams), np.int32))
    assert np.array_equal(plain, with_hidden), "asking for the hidden state changed the logits"
    folder.mkdir(parents=True, exist_ok=True)
    logits = np.lib.format.open_memmap(folder / f"{name}.logits.npy", "w+", np.float32, (len(tokens), session.llama.n_vocab))
    hidden, symbols = np.zeros((len(tokens), n_embd), np.float32), np.zeros(len(tokens), np.int32)
    recorder = Recorder(context, len(streams), logits, hidden, symbols)
    began = time.perf_counter()
    Lockstep(context, session.llama.bos, settings.ctx, settings.slide, recorder).encode(streams)
    logits.flush()
    np.savez(folder / f"{name}.meta.npz", hidden=hidden, running=np.array(recorder.running), symbols=symbols, nbytes=len(data),
             pieces=np.array(session.tokenizer.pieces, dtype=object))
    print(f"{name}: {len(tokens)} tokens in {time.perf_counter() - began:.0f} s")


def replay(name: str, folder: Path, mode: str, rank: int, lr: float, llm: bool, seed: int, top: int = 8) -> dict:
    logits, meta = stored_logits(folder, name)
    hidden, running, symbols = meta["hidden"], meta["running"], meta["symbols"]
    n_vocab, n_embd = logits.shape[1], hidden.shape[1]
    off = dict(ngram=False, match=False, bias=False, mixer=False, skip=False)
    predictor = EnsemblePredictor(n_vocab, int(running[0]), EnsembleConfig(**off) if llm else EnsembleConfig(), list(meta["pieces"]))
    rng = np.random.default_rng(seed)
    if mode == "lsh":
        projection = rng.standard_normal((n_embd, rank)).astype(np.float32)
        tables = np.zeros((1 << rank, n_vocab), np.float32)
        bit_values = 1 << np.arange(rank, dtype=np.int64)
    elif mode == "linear":
        projection = (rng.standard_normal((n_embd, rank)) / np.sqrt(n_embd)).astype(np.float32)
        learned = np.zeros((rank, n_vocab), np.float32)
    elif mode == "argmax":
        tables, squares = np.zeros((rank, n_vocab), np.float32), np.zeros((rank, n_vocab), np.float32)
    elif mode == "rows":
        corrections = np.zeros((n_vocab, n_embd), np.float32)
        touched, touched_rows = np.zeros(n_vocab, bool), np.empty(0, np.int64)
        mean, seen = np.zeros(n_embd, np.float64), 0
    bits, row = 0.0, 0
    began = time.perf_counter()
    for n in map(int, running):
        rows, h, tokens = np.array(logits[row:row + n]), hidden[row:row + n], symbols[row:row + n]
        if mode == "lsh":
            buckets = ((h @ projection) > 0).astype(np.int64) @ bit_values
            rows += tables[buckets]
        elif mode == "linear":
            features = h @ projection
            rows += features @ learned
        elif mode == "argmax":  # Knuth's multiplicative hash, as the previous-token tables
            buckets = (rows.argmax(axis=1).astype(np.int64) + 1) * 2654435761 % (1 << 32) % rank
            rows += tables[buckets]
        elif mode == "rows":
            centred = (h - mean.astype(np.float32)) if seen else np.zeros_like(h)
            if len(touched_rows):
                rows[:, touched_rows] += centred @ corrections[touched_rows].T
        want = predictor.want_logits(n)
        wanted = rows if want is None else rows[want.astype(bool)]
        probabilities = predictor.probabilities(np.ascontiguousarray(wanted), n)
        totals = probabilities.sum(axis=1)
        bits -= np.log2(probabilities[np.arange(n), tokens] / totals).sum()
        if mode != "none":
            gradient = (probabilities / totals[:, None]).astype(np.float32)
            gradient[np.arange(n), tokens] -= 1.0
            if mode == "lsh":
                for i in range(n):
                    tables[buckets[i]] -= lr * gradient[i]
            elif mode == "argmax":
                for i in range(n):
                    squares[buckets[i]] += gradient[i] * gradient[i]
                    tables[buckets[i]] -= (np.float32(lr) * gradient[i]) / np.sqrt(np.float32(1.0) + squares[buckets[i]])
            elif mode == "rows":
                for i in range(n):
                    learning = np.union1d(np.argpartition(gradient[i], -top)[-top:], tokens[i])
                    size = float(centred[i] @ centred[i])
                    if size > 0:
                        corrections[learning] -= (lr / size) * gradient[i, learning, None] * centred[i]
                    touched[learning] = True
                touched_rows = np.flatnonzero(touched)
                mean = (mean * seen + h.sum(axis=0, dtype=np.float64)) / (seen + n)
                seen += n
            else:
                learned -= lr * (features.T @ gradient)
        predictor.update(tokens)
        row += n
    return {"file": name, "mode": "llm only" if llm else mode, "r": rank if mode in ("lsh", "linear", "argmax") else None,
            "top": top if mode == "rows" else None, "lr": lr if mode != "none" else None,
            "preset": None if llm else DEFAULT_PRESET, "tokens": row, "bpb": bits / int(meta["nbytes"]),
            "seconds": round(time.perf_counter() - began, 1)}


def code(name: str, folder: Path, preset: str) -> dict:
    logits, meta = stored_logits(folder, name)
    predictor = EnsemblePredictor(logits.shape[1], int(meta["running"][0]), PRESETS[preset], list(meta["pieces"]))
    encoder = make_encoder("int24")
    for tokens, probabilities in replay_steps(predictor, logits, meta["running"], meta["symbols"]):
        encoder.encode(tokens, probabilities)
    coded = encoder.finish()
    weights = np.array([w for stream in predictor.streams for ws in stream.weights for w in ws])
    return {"file": name, "preset": preset, "npy_disable_cpu_features": os.environ.get("NPY_DISABLE_CPU_FEATURES", ""),
            "coded_bytes": len(coded), "coded_sha256": hashlib.sha256(coded).hexdigest()[:16],
            "mixer_weights_sha256": hashlib.sha256(weights.tobytes()).hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["dump", "replay", "code"])
    parser.add_argument("file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--mode", choices=["none", "lsh", "linear", "rows", "argmax"], default="none")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--top", type=int, default=8, help="rows: the most probable tokens whose rows learn beside the coded one")
    parser.add_argument("--lr", type=float, default=0.16)
    parser.add_argument("--llm", action="store_true", help="the model alone (with --mode none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--streams", type=int, help="dump: this many lockstep streams instead of the default")
    parser.add_argument("--bytes", type=int, help="dump: only the file's first BYTES bytes")
    args = parser.parse_args()
    if args.action == "dump":
        dump(args.file, args.dir, args.streams, args.bytes)
        return 0
    if args.action == "code":
        result, results = code(args.file, args.dir, args.preset), "preset-portability.json"
    else:
        result, results = replay(args.file, args.dir, args.mode, args.r, args.lr, args.llm, args.seed, args.top), "hidden-replay.json"
    print(json.dumps(result), flush=True)
    append_results(results, [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
