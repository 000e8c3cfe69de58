"""Helpers shared by the bench scripts: settings from the command line, timed round trips, machine facts."""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _results_folder() -> Path:
    """Where the running script's results go: bench/results for the benchmarks,
    bench/experiments/results for the experiments (the ``results`` folder beside the script)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    return HERE / "experiments" / "results" if script is not None and script.parent == HERE / "experiments" else HERE / "results"


RESULTS = _results_folder()
sys.path.insert(0, str(ROOT))

from nacrith import container as fmt  # noqa: E402
from nacrith import pipeline  # noqa: E402
from nacrith.predictors.ensemble import PARTS, PRESETS  # noqa: E402
from nacrith.attention import ATTENTION_MODES  # noqa: E402
from nacrith.settings import DEFAULT_GPU_STREAMS  # noqa: E402


def file_parser(doc: str | None, default_file: str, gpu: bool = False) -> argparse.ArgumentParser:
    """The parser of a bench script that measures one file: ``doc`` (its docstring) as the help,
    the file (``corpora/data/default_file`` when not given), ``--tag`` (the results' name,
    "cpu" by default) and, with ``gpu``, ``--gpu``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, default=ROOT / "corpora" / "data" / default_file)
    parser.add_argument("--tag", default="cpu", help="names the results: bench/results/<script>-<tag>.*")
    if gpu:
        parser.add_argument("--gpu", action="store_true")
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = pipeline.Settings()
    parser.add_argument("--streams", type=int, default=None, help=f"default: {defaults.streams}, {DEFAULT_GPU_STREAMS} with --gpu")
    parser.add_argument("--ctx", type=int, default=defaults.ctx)
    parser.add_argument("--slide", type=int, default=None, help="default: the pipeline's, or ctx/4 when --ctx is given")
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--llm-only", action="store_true")
    parser.add_argument("--preset", choices=("v4", "v5"), default="v4", help="the ensemble's preset (v5: integer arithmetic, on the GPU with --gpu --engine exact)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default=None, help="default: the backend's (nacrith.engine.default_attention)")
    parser.add_argument("--engine", choices=("exact", "llama.cpp"), default=None, help="default: nacrith's (exact; llama.cpp with --gpu)")
    for part in PARTS:
        parser.add_argument(f"--no-{part}", action="store_true")


def settings_from_arguments(args: argparse.Namespace, **overrides) -> pipeline.Settings:
    defaults = pipeline.Settings()
    slide = args.slide if args.slide is not None else (defaults.slide if args.ctx == defaults.ctx else args.ctx // 4)
    ensemble = None
    if not args.llm_only:
        ensemble = replace(PRESETS[args.preset], **{part: False for part in PARTS if getattr(args, f"no_{part}")})
    values = dict(streams=args.streams, ctx=args.ctx, slide=slide, block_size=args.block_size, threads=args.threads, gpu=args.gpu, ensemble=ensemble,
                  attention=args.attention, engine=args.engine)
    values.update(overrides)
    return pipeline.Settings(**values)


def run_process(python: str, args: list[str], checkout: Path = ROOT, cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python ARGS`` as a whole process with ``checkout``'s nacrith first on PYTHONPATH:
    (its wall seconds, its result, output captured)."""
    began = time.perf_counter()
    done = subprocess.run([python, *args], env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - began, done


def succeeded(done: subprocess.CompletedProcess) -> bytes:
    """The standard output of a process that must succeed (else its error ends the script)."""
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, done.args))} failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def machine() -> str:
    from nacrith.devices import gpus
    from nacrith.engine import L
    from nacrith.settings import default_threads

    info = L.llama_print_system_info().decode().strip().rstrip("|").strip()
    cards = ", ".join(sorted({device.description for device in gpus()}))  # the GPU's name, where llama.cpp sees one
    return f"{platform.machine()}, {default_threads()} cores{'; ' + cards if cards else ''}; llama.cpp: {info}"


@dataclass(frozen=True)
class RoundTrip:
    """One timed compression and decompression of the same bytes."""

    blob: bytes
    exact: bool
    compress_s: float
    decompress_s: float
    tokens: int  # tokens coded by the model

    @property
    def compress_tok_s(self) -> float:
        return self.tokens / self.compress_s

    @property
    def decompress_tok_s(self) -> float:
        return self.tokens / self.decompress_s


@dataclass(frozen=True)
class Compressed:
    """One timed compression: the container, its parse, and the seconds it took."""

    blob: bytes
    parsed: fmt.Container
    seconds: float

    @property
    def tokens(self) -> int:
        """Tokens coded by the model."""
        return sum(block.n_tokens for block in self.parsed.blocks)

    @property
    def streams(self) -> list[int]:
        """Lockstep streams of each block."""
        return [len(block.stream_tokens) for block in self.parsed.blocks]


def timed_compress(data: bytes, settings: pipeline.Settings, session=None, workers=1, ray: str | None = None) -> Compressed:
    """Compress ``data`` through the pipeline (in ``session`` where given, else loading the
    model, which the time then includes; on Ray actors with ``ray``)."""
    packed = io.BytesIO()
    began = time.perf_counter()
    pipeline.compress_stream(io.BytesIO(data), packed, settings, session=session, workers=workers, ray=ray)
    seconds = time.perf_counter() - began
    blob = packed.getvalue()
    return Compressed(blob, fmt.parse(blob), seconds)


def round_trip(data: bytes, settings: pipeline.Settings, workers=1, ray: str | None = None) -> RoundTrip:
    """Compress ``data`` and decompress the result through the pipeline (model loading included;
    on Ray actors with ``ray``)."""
    compressed = timed_compress(data, settings, workers=workers, ray=ray)
    restored = io.BytesIO()
    began = time.perf_counter()
    # an exact engine's file decodes on the GPUs where it was made on them (a llama.cpp file picks its own backend)
    gpu_ids = (settings.gpu_ids or ()) if settings.gpu and settings.engine == "exact" else None
    pipeline.decompress_to(compressed.blob, restored, threads=settings.threads, workers=workers, gpu_ids=gpu_ids, ray=ray)
    decompress_s = time.perf_counter() - began
    return RoundTrip(compressed.blob, restored.getvalue() == data, compressed.seconds, decompress_s, compressed.tokens)


def append_results(name: str, rows: list) -> Path:
    """Append ``rows`` to the JSON list in :data:`RESULTS`/``name`` (made if missing)."""
    import json

    path = RESULTS / name
    previous = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(previous + rows, indent=1))
    return path


def stored_logits(folder: Path, name: str):
    """The logits rows ``bench/experiments/hidden_replay.py dump`` stored for a corpus file (memory-mapped,
    one row per token in lockstep order) and its metadata (``running``: streams per step,
    ``symbols``, ``nbytes``, ``pieces``, ``hidden``)."""
    import numpy as np

    return np.load(folder / f"{name}.logits.npy", mmap_mode="r"), np.load(folder / f"{name}.meta.npz", allow_pickle=True)


def stored_steps(folder: Path, name: str, limit: int):
    """The whole lockstep steps of :func:`stored_logits` that fit in ``limit`` tokens, their
    rows read into memory: (rows, streams per step, symbols, metadata)."""
    import numpy as np

    logits, meta = stored_logits(folder, name)
    running = np.asarray(meta["running"])
    steps = np.cumsum(running) <= limit
    return np.array(logits[: int(running[steps].sum())]), running[steps], np.asarray(meta["symbols"]), meta


def replay_steps(predictor, logits, running, symbols):
    """Feed stored logits rows to ``predictor`` step by step as the lockstep loop would
    (only the rows it wants); yields each step's (tokens, probabilities) before the
    predictor learns the tokens."""
    import numpy as np

    row = 0
    for n in map(int, running):
        rows, tokens = np.asarray(logits[row:row + n]), symbols[row:row + n]
        want = predictor.want_logits(n)
        yield tokens, predictor.probabilities(rows if want is None else np.ascontiguousarray(rows[want.astype(bool)]), n)
        predictor.update(tokens)
        row += n


class TimedKernels:
    """A kernel module (nacrith._kernels) with a stopwatch around every call: ``seconds``
    per function name, ``total`` over all; ``clock``: time.perf_counter (wall) or
    time.thread_time (the calling thread's CPU time)."""

    def __init__(self, kernels, clock=None):
        import time

        self.kernels, self.seconds, self.clock = kernels, {}, clock or time.perf_counter

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def __getattr__(self, name):
        function = getattr(self.kernels, name)

        def timed(*args):
            began = self.clock()
            try:
                return function(*args)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - began
        return timed
