"""Where a token's time goes at a high stream count: model step, predictor, range coder, rest.

Runs the real lockstep encoder of one block for ``--steps`` steps of ``--streams`` streams,
with timers around each part:

* model step: ``llama_decode`` plus reading the logits rows (``LockstepContext.step``);
* want: the predictor choosing which streams need the model (skip decision);
* probabilities: logits to float64 rows (the LLM table, and the ensemble's mixing);
* coder: the range coder (``--coders``: nacrith's int24, constriction's);
* update: the predictor learning from the coded tokens;
* kv clear: clearing the KV cache when the block starts (``LockstepContext.reset``): once
  per block, so with a few dozen steps it weighs far more per token than over a whole block;
* rest: the lockstep loop itself (Python), the difference to the wall time.

``--compare-numpy`` runs each predictor a second time with the numpy code
instead of the C kernel, and checks that both code the same bytes. ``--coders
int24,constriction`` runs each predictor with each range coder.

On a GPU the model step shrinks; everything else is CPU work in the worker process and is
what bounds one worker's tokens per second. Usage:
    python bench/profile.py [FILE] [--streams 256] [--steps 24] [--bytes 400000] [--compare-numpy] [--coders int24,constriction]
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, file_parser, machine  # noqa: E402

from nacrith import lockstep as lockstep_module  # noqa: E402
from nacrith import pipeline  # noqa: E402
from nacrith.coder import DEFAULT_CODER  # noqa: E402
from nacrith.predictors import llm as llm_module  # noqa: E402
from nacrith.predictors import make_predictor, predictor_settings  # noqa: E402
from nacrith.predictors.ensemble import EnsembleConfig  # noqa: E402
from nacrith.session import Session  # noqa: E402

PARTS = ("model step", "want", "probabilities", "coder", "update", "kv clear")


class Timers:
    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def wrap(self, part: str, function):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - began
        return timed


def profile(session: Session, streams: list, settings: pipeline.Settings, ensemble: EnsembleConfig | None, kernel: bool = True, coder: str = DEFAULT_CODER) -> dict:
    timers = Timers()
    saved_kernels = llm_module._kernels
    if not kernel:  # the numpy reference: the same bits, for the before/after comparison
        llm_module._kernels = None
    predictor = make_predictor(predictor_settings(ensemble), session.llama.n_vocab, len(streams), session.tokenizer.pieces, session.threads or 1)
    llm_module._kernels = saved_kernels
    for method, part in (("want_logits", "want"), ("probabilities", "probabilities"), ("update", "update")):
        setattr(predictor, method, timers.wrap(part, getattr(predictor, method)))
    context = session.context(len(streams), settings.ctx)
    context.step = timers.wrap("model step", context.step)
    context.reset = timers.wrap("kv clear", context.reset)

    original = lockstep_module.make_encoder

    def timed_encoder(name):
        encoder = original(name)
        encoder.encode = timers.wrap("coder", encoder.encode)
        return encoder

    lockstep_module.make_encoder = timed_encoder
    try:
        began = time.perf_counter()
        coded = lockstep_module.Lockstep(context, session.llama.bos, settings.ctx, settings.slide, predictor, coder=coder).encode(streams)
        wall = time.perf_counter() - began
    finally:
        lockstep_module.make_encoder = original
        del context.step, context.reset  # the session caches the context: unwrap it
    tokens = sum(len(stream) for stream in streams)
    per_token = {part: 1e6 * seconds / tokens for part, seconds in timers.seconds.items()}
    per_token["rest"] = 1e6 * wall / tokens - sum(per_token.values())
    label = ("llm only" if ensemble is None else "ensemble (default)") + f", {coder} coder" + ("" if kernel else ", numpy (no C kernel)")
    cpu_side = sum(value for part, value in per_token.items() if part not in ("model step", "kv clear"))  # llama.cpp, or once per block
    return {"predictor": label, "coder": coder, "kernel": kernel and saved_kernels is not None, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "us_per_token": per_token, "cpu_side_us_per_token": cpu_side,
            "coded_sha256": hashlib.sha256(coded).hexdigest()}


def markdown(rows: list[dict], args, streams: int) -> str:
    columns = list(PARTS) + ["rest"]
    lines = ["# Where a token's time goes", "", f"{args.file.name}, {streams} lockstep streams x {args.steps} steps, ctx {args.ctx}, one process. Machine: {machine()}.", "",
             "Microseconds per token (share of the total):", "",
             "| predictor | " + " | ".join(columns) + " | total | all but the model step and kv clear | tokens/s |", "|---|" + "---:|" * (len(columns) + 3)]
    for row in rows:
        total = sum(row["us_per_token"].values())
        cells = [f"{row['us_per_token'][part]:.0f} ({100 * row['us_per_token'][part] / total:.0f}%)" for part in columns]
        lines.append(f"| {row['predictor']} | " + " | ".join(cells) + f" | {total:.0f} | {row['cpu_side_us_per_token']:.0f} | {row['tok_s']:.0f} |")
    pairs = {}
    for row in rows:
        pairs.setdefault(row["predictor"].replace(", numpy (no C kernel)", ""), set()).add(row["coded_sha256"])  # same predictor and coder
    if any(not row["kernel"] for row in rows):
        same = all(len(hashes) == 1 for hashes in pairs.values())
        lines += ["", "Coded output with the C kernel and with numpy: " + ("identical" if same else "**DIFFERENT**") + " for each predictor."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = file_parser(__doc__, "bible.txt")
    parser.add_argument("--bytes", type=int, default=400_000)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compare-numpy", action="store_true", help="also run each predictor with the numpy code instead of the C kernel")
    parser.add_argument("--coders", default=DEFAULT_CODER, help="comma-separated range coders to run each predictor with (nacrith.coder.CODERS)")
    args = parser.parse_args()
    settings = pipeline.Settings(streams=args.streams, ctx=args.ctx, slide=args.ctx // 4, min_stream_tokens=1)
    session = Session(threads=args.threads)
    tokens = pipeline.text_tokens(args.file.read_bytes()[: args.bytes], session.tokenizer)
    streams = [stream[: args.steps] for stream in pipeline.lockstep_streams(tokens, settings)]
    rows = []
    for ensemble in (None, EnsembleConfig()):
        for coder in args.coders.split(","):
            for kernel in (True, False) if args.compare_numpy else (True,):
                rows.append(profile(session, streams, settings, ensemble, kernel, coder))
                print(json.dumps(rows[-1]), flush=True)
    session.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile-{args.tag}.json").write_text(json.dumps({"file": args.file.name, "streams": len(streams), "steps": args.steps, "machine": machine(), "rows": rows}, indent=1))
    (RESULTS / f"profile-{args.tag}.md").write_text(markdown(rows, args, len(streams)))
    print(f"wrote {RESULTS}/profile-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
