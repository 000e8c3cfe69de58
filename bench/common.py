"""Helpers shared by the bench scripts: settings from the command line, machine facts."""
from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

from nacrith import pipeline  # noqa: E402
from nacrith.predictors import EnsembleConfig  # noqa: E402

PARTS = ("ngram", "match", "bias", "mixer", "skip")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = pipeline.Settings()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--ctx", type=int, default=defaults.ctx)
    parser.add_argument("--slide", type=int, default=None, help="default: the pipeline's, or ctx/4 when --ctx is given")
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--llm-only", action="store_true")
    for part in PARTS:
        parser.add_argument(f"--no-{part}", action="store_true")


def settings_from_arguments(args: argparse.Namespace, **overrides) -> pipeline.Settings:
    defaults = pipeline.Settings()
    slide = args.slide if args.slide is not None else (defaults.slide if args.ctx == defaults.ctx else args.ctx // 4)
    ensemble = None
    if not args.llm_only:
        ensemble = replace(defaults.ensemble or EnsembleConfig(), **{part: False for part in PARTS if getattr(args, f"no_{part}")})
    values = dict(streams=args.streams, ctx=args.ctx, slide=slide, block_size=args.block_size, threads=args.threads, gpu=args.gpu, ensemble=ensemble)
    values.update(overrides)
    return pipeline.Settings(**values)


def machine() -> str:
    from nacrith.engine import L, default_threads

    info = L.llama_print_system_info().decode().strip().rstrip("|").strip()
    return f"{platform.machine()}, {default_threads()} cores; llama.cpp: {info}"
