"""Throughput: the engine's raw lockstep decode against nacrith end to end, in the same run.

The raw run makes exactly the engine calls nacrith makes for the same text, streams and
window (one token per stream per llama_decode, the same slides) and reads every logit row
into numpy, but does no prediction or coding. nacrith then compresses and decompresses the
same text with the same settings. With ``--workers N`` both sides run N processes at once
(one context each), the raw side on N equal slices of the text; with ``PxL`` each process
runs L contexts in threads (lanes), the raw side too; ``auto`` is resolved as nacrith's
command line resolves it (on a GPU with ``--llm-only``: 2 processes of 4 lanes).

Usage: python bench/throughput.py [FILE] [--bytes N] [--streams N] [--ctx N] [--workers N|PxL|auto] [--gpu] [--engine exact|llama.cpp] [--tag NAME]
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, file_parser, add_settings_arguments, machine, round_trip, settings_from_arguments  # noqa: E402

from nacrith import container as fmt  # noqa: E402
from nacrith import pipeline  # noqa: E402


def raw_decode(data: bytes, settings, main_gpu: int) -> tuple[int, float]:
    """(tokens, seconds) of the engine calls alone for one block of text."""
    import numpy as np

    from nacrith.lockstep import KEEP
    from nacrith.session import Session

    session = Session(settings.model, gpu=settings.gpu, threads=settings.threads, main_gpu=main_gpu, engine=settings.engine)
    streams = pipeline.lockstep_streams(pipeline.text_tokens(data, session.tokenizer), settings)
    lengths = [len(stream) for stream in streams]
    context = session.context(len(lengths), settings.ctx)
    # the exact engine's PyTorch logits stay on their device, as the model-only predictor takes them
    on_device = getattr(context, "device_logits", None) is not None and session.llama.backend == "cuda" and settings.model_only
    if on_device:
        context.device_logits = True
    tokens, starts = np.concatenate(streams), np.cumsum([0] + lengths[:-1])
    context.reset()
    previous = np.full(len(lengths), session.llama.bos, np.int32)
    position, running = 0, len(lengths)
    began = time.perf_counter()
    for step in range(lengths[0]):
        while lengths[running - 1] <= step:
            running -= 1
        if position == settings.ctx:
            for stream in range(running):
                context.slide(stream, KEEP, settings.slide)
            position -= settings.slide
        logits = context.step(previous[:running], np.full(running, position, np.int32))
        if on_device:
            logits._weights()[1].sum().item()  # the int24 weights of every row, as the coder needs them (and a sync)
        else:
            logits.max()  # read every logit, as the predictor must
        previous[:running] = tokens[starts[:running] + step]
        position += 1
    return sum(lengths), time.perf_counter() - began


def raw_process(args) -> list[tuple[int, float]]:
    """raw_decode of each part side by side, one thread (lane) each, as a worker's lanes run."""
    parts, settings, main_gpu = args
    if len(parts) == 1:
        return [raw_decode(parts[0], settings, main_gpu)]
    with ThreadPoolExecutor(len(parts)) as lanes:
        return list(lanes.map(lambda part: raw_decode(part, settings, main_gpu), parts))


def slices(data: bytes, parts: int) -> list[bytes]:
    size = -(-len(data) // parts)
    return [data[i:i + size] for i in range(0, len(data), size)]


def main() -> int:
    parser = file_parser(__doc__, "alice29.txt")
    parser.add_argument("--bytes", type=int, default=40_000, help="prefix of the file to use")
    parser.add_argument("--workers", default="1", help="N processes, or PxL: P processes of L lanes")
    add_settings_arguments(parser)
    args = parser.parse_args()
    data = args.file.read_bytes()[: args.bytes]
    from nacrith.workers import plan_workers

    settings = settings_from_arguments(args, fallback=False)
    # "auto" resolves as nacrith's command line resolves it; each context then gets one block
    plan = plan_workers(args.workers, settings.gpu, settings.streams, settings.ctx, settings.threads, model_only=settings.model_only,
                        engine=settings.engine)
    processes, lanes = plan.processes, plan.lanes
    parts = slices(data, processes * lanes)
    settings = replace(settings, block_size=len(parts[0]))
    raw_settings = settings if settings.threads else replace(settings, threads=plan.threads)
    jobs = [(parts[p * lanes:(p + 1) * lanes], raw_settings, device or 0) for p, device in enumerate(plan.devices)]
    began = time.perf_counter()
    if processes == 1:
        results = raw_process(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = [lane for process in pool.map(raw_process, jobs) for lane in process]
    raw_wall = time.perf_counter() - began
    tokens = sum(n for n, _ in results)
    # raw: the slowest process decides (model loading excluded, as below)
    raw_rate = tokens / max(seconds for _, seconds in results)

    trip = round_trip(data, settings, f"{processes}x{lanes}")
    row = {
        "file": args.file.name,
        "bytes": len(data),
        "tokens": trip.tokens,
        "streams": settings.streams,
        "streams_used": max((len(block.stream_tokens) for block in fmt.parse(trip.blob).blocks), default=0),
        "ctx": settings.ctx,
        "workers": args.workers,
        "processes": processes,
        "lanes": lanes,
        "backend": settings.backend,
        "engine": settings.engine,
        "exact_options": " ".join(f"{name}=1" for name in ("NACRITH_EXACT_TRITON", "NACRITH_EXACT_GRAPH") if os.environ.get(name) == "1"),
        "predictor": settings.predictor_name,
        "raw_tok_s": raw_rate,
        "raw_wall_s": raw_wall,
        "compress_tok_s": trip.compress_tok_s,
        "decompress_tok_s": trip.decompress_tok_s,
        "compress_KB_s": len(data) / trip.compress_s / 1000,
        "decompress_KB_s": len(data) / trip.decompress_s / 1000,
        "compress_ratio_to_raw": trip.compress_tok_s / raw_rate,
        "decompress_ratio_to_raw": trip.decompress_tok_s / raw_rate,
        "bpb": 8 * len(trip.blob) / len(data),
        "exact": trip.exact,
        "machine": machine(),
    }
    print(json.dumps(row, indent=1))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"throughput-{args.tag}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    return 0 if row["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
