"""Ablation: what each ensemble part is worth, in coded bytes, measured in one model pass.

The predictors of every configuration read the same logits in the same lockstep run: a
*tee* predictor asks the model for every stream, hands each configuration the rows it
wants (a configuration with skip on gets only its non-skipped rows) and range-codes the
true tokens with each configuration's own distributions. The sizes are therefore the exact
coded sizes each configuration would produce on its own (on the CPU a stream's logits do
not depend on which other rows are output). Each configuration's CPU time is measured
around its own calls, next to the model step's time.

Speed with and without skip is measured by separate real runs (``--speed``).

Usage: python bench/ablation.py [--files ...] [--speed FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine  # noqa: E402

from nacrith import pipeline  # noqa: E402
from nacrith.coder import make_encoder  # noqa: E402
from nacrith.lockstep import Lockstep  # noqa: E402
from nacrith.predictors import EnsembleConfig, make_predictor, predictor_settings  # noqa: E402
from nacrith.predictors.ensemble import PRESETS  # noqa: E402
from nacrith.session import Session  # noqa: E402

DATA = ROOT / "corpora" / "data"
FILES = [("alice29.txt", None), ("asyoulik.txt", None), ("cp.html", None), ("fields.c", None), ("xargs.1", None), ("lcet10.txt", 100_000)]
OFF = dict(ngram=False, match=False, bias=False, mixer=False, skip=False)
CONFIGS = {
    "llm only": None,
    "+ngram": EnsembleConfig(**{**OFF, "ngram": True}),
    "+match": EnsembleConfig(**{**OFF, "match": True}),
    "+bias": EnsembleConfig(**{**OFF, "bias": True}),
    "+ngram+match+mixer": EnsembleConfig(**{**OFF, "ngram": True, "match": True, "mixer": True}),
    "all but match": replace(EnsembleConfig(), match=False),
    "all but skip": replace(EnsembleConfig(), skip=False),
    "v1": PRESETS["v1"],
    "v2": PRESETS["v2"],
    "v3 (previous default)": PRESETS["v3"],
    "all (default)": EnsembleConfig(),
    "v5 (integer)": PRESETS["v5"],
}


class Tee:
    """Feeds one model pass to several predictors, each with its own range coder."""

    def __init__(self, predictors: dict, tokens_per_step):
        self.predictors = predictors
        self.encoders = {name: make_encoder() for name in predictors}
        self.seconds = {name: 0.0 for name in predictors}
        self.wants: dict = {}
        self.rows: dict = {}
        self.model_seconds = 0.0
        self._model_started = None

    def want_logits(self, running):
        for name, predictor in self.predictors.items():
            began = time.perf_counter()
            want = predictor.want_logits(running)
            self.seconds[name] += time.perf_counter() - began
            self.wants[name] = np.ones(running, bool) if want is None else want.astype(bool)
        self._model_started = time.perf_counter()
        return None

    def probabilities(self, logits, running):
        self.model_seconds += time.perf_counter() - self._model_started
        logits = np.array(logits)  # each predictor gets its own copy of the rows it wants
        for name, predictor in self.predictors.items():
            rows = logits[self.wants[name]]
            began = time.perf_counter()
            rows = predictor.probabilities(rows, running)
            self.rows[name] = rows.copy() if isinstance(rows, np.ndarray) else rows  # the integer ensemble's WeightRows: coded in update(), before its next step
            self.seconds[name] += time.perf_counter() - began
        return np.ones((running, logits.shape[1]))

    def update(self, symbols):
        for name, predictor in self.predictors.items():
            began = time.perf_counter()
            self.encoders[name].encode(symbols, self.rows[name])
            predictor.update(symbols)
            self.seconds[name] += time.perf_counter() - began


def measure_file(session: Session, path: Path, limit: int | None, settings: pipeline.Settings, configs: dict) -> dict:
    data = path.read_bytes()[:limit]
    tokens = pipeline.text_tokens(data, session.tokenizer)
    streams = pipeline.lockstep_streams(tokens, settings)
    lengths = [len(stream) for stream in streams]
    vocab = session.llama.n_vocab
    predictors = {name: make_predictor(predictor_settings(config), vocab, len(lengths), session.tokenizer.pieces) for name, config in configs.items()}
    tee = Tee(predictors, None)
    context = session.context(len(lengths), settings.ctx)
    began = time.perf_counter()
    Lockstep(context, session.llama.bos, settings.ctx, settings.slide, tee).encode(streams)
    wall = time.perf_counter() - began
    result = {"file": path.name + (f" (first {limit} B)" if limit else ""), "bytes": len(data), "tokens": len(tokens), "streams": len(lengths), "model_s": tee.model_seconds, "wall_s": wall, "configs": {}}
    for name, predictor in predictors.items():
        size = len(tee.encoders[name].finish())
        result["configs"][name] = {
            "coded_bytes": size,
            "bpb": 8 * size / len(data),
            "predictor_s": tee.seconds[name],
            "predictor_share_of_model": tee.seconds[name] / tee.model_seconds,
            "skipped": getattr(predictor, "skipped", 0) / len(tokens),
        }
    return result


def speed_runs(path: Path, settings: pipeline.Settings, repeat: int = 1) -> list[dict]:
    """Real compressions with skip on and off: tokens/s and size (the file ``repeat`` times over)."""
    data = path.read_bytes() * repeat
    rows = []
    for name, config in (("all but skip", replace(EnsembleConfig(), skip=False)), ("all (default)", EnsembleConfig())):
        run = replace(settings, ensemble=config, fallback=False)
        session = Session(threads=settings.threads)
        packed = io.BytesIO()
        began = time.perf_counter()
        pipeline.compress_stream(io.BytesIO(data), packed, run, session=session)
        seconds = time.perf_counter() - began
        session.close()
        from nacrith import container as fmt

        tokens = sum(block.n_tokens for block in fmt.parse(packed.getvalue()).blocks)
        rows.append({"config": name, "file": path.name + (f" x{repeat}" if repeat > 1 else ""), "bytes": len(packed.getvalue()), "bpb": 8 * len(packed.getvalue()) / len(data), "seconds": seconds, "tok_s": tokens / seconds})
    return rows


def markdown(results: list[dict], speed: list[dict]) -> str:
    names = list(results[0]["configs"]) if results else []
    lines = ["# Ensemble ablation", "", f"Machine: {machine()}.", "",
             "Coded size in bits per byte (range-coder payload only, no container framing), one model pass feeding every configuration:", "",
             "| file | tokens | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for result in results:
        llm = result["configs"]["llm only"]["bpb"]
        cells = []
        for name in names:
            bpb = result["configs"][name]["bpb"]
            cells.append(f"{bpb:.4f}" + ("" if name == "llm only" else f" ({100 * (bpb / llm - 1):+.1f}%)"))
        lines.append(f"| {result['file']} | {result['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "Predictor CPU time per token (µs) and as a share of the model step's time, both measured in the same run, and how often skip fired:", "",
              "| file | model step µs/token | " + " | ".join(names) + " | skip fired |", "|---|---:|" + "---:|" * len(names) + "---:|"]
    for result in results:
        per_token = 1e6 / result["tokens"]
        cells = [f"{per_token * result['configs'][name]['predictor_s']:.0f} ({100 * result['configs'][name]['predictor_share_of_model']:.1f}%)" for name in names]
        lines.append(f"| {result['file']} | {per_token * result['model_s']:.0f} | " + " | ".join(cells) + f" | {100 * max(c['skipped'] for c in result['configs'].values()):.1f}% |")
    lines += ["", "Tokens per second each configuration would run at on its own without skip savings (tokens / (model step time + its predictor time)); real skip-on/off speeds are below:", "",
              "| file | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for result in results:
        cells = [f"{result['tokens'] / (result['model_s'] + result['configs'][name]['predictor_s']):.0f}" for name in names]
        lines.append(f"| {result['file']} | " + " | ".join(cells) + " |")
    if speed:
        lines += ["", "Real compressions, skip off and on:", "", "| file | configuration | container bytes | bpb | seconds | tokens/s |", "|---|---|---:|---:|---:|---:|"]
        for row in speed:
            lines.append(f"| {row['file']} | {row['config']} | {row['bytes']} | {row['bpb']:.4f} | {row['seconds']:.1f} | {row['tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", help="file names in corpora/data (default: the issue's list)")
    parser.add_argument("--speed", nargs="*", default=[], help="files for real skip on/off runs")
    parser.add_argument("--speed-repeat", type=int, default=1, help="repeat each --speed file this many times (repetitive text, where skip fires)")
    parser.add_argument("--speed-pairs", type=int, default=1, help="skip off/on pairs per --speed file (this VM's speed varies between runs)")
    parser.add_argument("--configs", help="comma-separated configuration names (default: all)")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    settings = pipeline.Settings()
    chosen = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    configs = {name: CONFIGS[name] for name in ["llm only"] + [n for n in chosen if n != "llm only"]}
    files = [(name, None) for name in args.files] if args.files else FILES
    session = Session()
    results = []
    for name, limit in files:
        result = measure_file(session, DATA / name, limit, settings, configs)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "configs"}), {n: round(c["bpb"], 4) for n, c in result["configs"].items()}, flush=True)
    session.close()
    speed = []
    for name in args.speed:
        for _ in range(args.speed_pairs):
            speed += speed_runs(DATA / name, settings, args.speed_repeat)
            print(speed[-2:], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ablation-{args.tag}.json").write_text(json.dumps({"results": results, "speed": speed}, indent=1))
    (RESULTS / f"ablation-{args.tag}.md").write_text(markdown(results, speed))
    print(f"wrote {RESULTS}/ablation-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
