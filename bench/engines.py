"""Engines: the exact engine against llama.cpp, same files, level and streams.

For each file, engine and predictor (the default ensemble, and the model alone with
``--llm-only``) it compresses and decompresses in a fresh process, checks the result, and
records bits per byte, tokens per second both ways and the process's peak memory (RSS).
Then, for the exact engine, each implementation's raw tokens per second: the engine calls
of compressing ``--impl-bytes`` of the first file in 16 streams, no prediction or coding.

Usage: python bench/engines.py [FILES...] [--bytes 40000] [--engines llama.cpp,exact]
       [--predictors ensemble,llm-only] [--impls simd,scalar,avx2,reference,torch] [--impl-bytes 8000]
       [--threads N] [--tag cpu]

``--bytes 0`` takes whole files. Results: bench/results/engines-<tag>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine  # noqa: E402

CHILD = r"""
import io, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from nacrith import pipeline
mode, source, target, options = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
data = open(source, "rb").read()
began = time.perf_counter()
if mode == "compress":
    out = pipeline.compress(data, **options)
else:
    out = pipeline.decompress(data, threads=options.get("threads"))
seconds = time.perf_counter() - began
open(target, "wb").write(out)
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(mode: str, source: Path, target: Path, options: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, str(source), str(target), json.dumps(options)], capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def measure(path: Path, nbytes: int, engine: str, llm_only: bool, threads: int | None, work: Path) -> dict:
    from nacrith import container as fmt

    data = path.read_bytes()
    data = data[:nbytes] if nbytes else data
    source = work / f"{path.name}.in"
    source.write_bytes(data)
    packed, restored = work / f"{path.name}.nc", work / f"{path.name}.out"
    options = {"engine": engine, "threads": threads}
    if llm_only:
        options["ensemble"] = None
    compressed = run_child("compress", source, packed, options)
    decompressed = run_child("decompress", packed, restored, {"threads": threads})
    blob = packed.read_bytes()
    parsed = fmt.parse(blob)
    tokens = sum(block.n_tokens for block in parsed.blocks)
    return {
        "file": path.name, "bytes": len(data), "engine": engine, "predictor": "llm-only" if llm_only else "ensemble",
        "compressed": len(blob), "bpb": round(8 * len(blob) / len(data), 4), "tokens": tokens,
        "streams": sum(len(block.stream_tokens) for block in parsed.blocks),
        "compress_s": round(compressed["seconds"], 2), "decompress_s": round(decompressed["seconds"], 2),
        "compress_tok_s": round(tokens / compressed["seconds"], 1), "decompress_tok_s": round(tokens / decompressed["seconds"], 1),
        "peak_mb": round(max(compressed["peak_mb"], decompressed["peak_mb"])), "exact": restored.read_bytes() == data,
    }


def implementation_rates(path: Path, nbytes: int, implementations: list[str], threads: int | None) -> list[dict]:
    """Raw tokens per second of each exact-engine implementation: the engine calls alone."""
    import numpy as np

    from nacrith import pipeline
    from nacrith.lockstep import KEEP
    from nacrith.session import Session

    rows = []
    settings = pipeline.Settings(engine="exact", threads=threads, streams=16, min_stream_tokens=64)
    for name in implementations:
        os.environ["NACRITH_EXACT_IMPL"] = name
        session = Session(engine="exact", threads=threads)
        try:
            data = path.read_bytes()[:nbytes]
            streams = pipeline.lockstep_streams(pipeline.text_tokens(data, session.tokenizer), settings)
            lengths = [len(stream) for stream in streams]
            context = session.context(len(lengths), settings.ctx)
            table = np.zeros((len(lengths), lengths[0]), np.int32)
            for row, tokens in enumerate(streams):
                table[row, : len(tokens)] = tokens
            context.reset()
            previous = np.full(len(lengths), session.llama.bos, np.int32)
            position, running, began = 0, len(lengths), time.perf_counter()
            for step in range(lengths[0]):
                while running and lengths[running - 1] <= step:
                    running -= 1
                if position == settings.ctx:
                    for stream in range(running):
                        context.slide(stream, KEEP, settings.slide)
                    position -= settings.slide
                context.step(previous[:running], np.full(running, position, np.int32))
                previous[:running] = table[:running, step]
                position += 1
            seconds = time.perf_counter() - began
            rows.append({"implementation": name, "runs": session.llama.description, "tokens": sum(lengths), "streams": len(lengths),
                         "seconds": round(seconds, 2), "tok_s": round(sum(lengths) / seconds, 1)})
        finally:
            session.close()
            os.environ.pop("NACRITH_EXACT_IMPL", None)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Engines ({result['date']})", "", f"Command: `{result['command']}`", "", f"Machine: {result['machine']}", "",
             "| file | bytes | engine | predictor | streams | compressed | bits/byte | compress tok/s | decompress tok/s | peak MB | exact |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for row in result["rows"]:
        lines.append(f"| {row['file']} | {row['bytes']} | {row['engine']} | {row['predictor']} | {row['streams']} | {row['compressed']} | "
                     f"{row['bpb']:.4f} | {row['compress_tok_s']} | {row['decompress_tok_s']} | {row['peak_mb']} | {'yes' if row['exact'] else 'NO'} |")
    pairs = {}
    for row in result["rows"]:
        pairs.setdefault((row["file"], row["predictor"]), {})[row["engine"]] = row
    lines += ["", "| file | predictor | exact / llama.cpp bits | compress speed | decompress speed |", "|---|---|---:|---:|---:|"]
    for (file, predictor), engines in pairs.items():
        if {"exact", "llama.cpp"} <= set(engines):
            a, b = engines["exact"], engines["llama.cpp"]
            lines.append(f"| {file} | {predictor} | {100 * (a['compressed'] / b['compressed'] - 1):+.2f}% | "
                         f"{a['compress_tok_s'] / b['compress_tok_s']:.2f}x | {a['decompress_tok_s'] / b['decompress_tok_s']:.2f}x |")
    if result["implementations"]:
        lines += ["", f"Exact engine implementations, raw engine calls ({result['implementations'][0]['tokens']} tokens, "
                  f"{result['implementations'][0]['streams']} streams):", "", "| implementation | runs | tokens/s |", "|---|---|---:|"]
        lines += [f"| {row['implementation']} | {row['runs']} | {row['tok_s']} |" for row in result["implementations"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, default=[ROOT / "corpora" / "data" / name for name in ("alice29.txt", "asyoulik.txt")])
    parser.add_argument("--bytes", type=int, default=40000, help="the first N bytes of each file; 0 for whole files")
    parser.add_argument("--engines", default="llama.cpp,exact", help="'' to time the implementations only")
    parser.add_argument("--predictors", default="ensemble,llm-only")
    parser.add_argument("--impls", default="simd,scalar,avx2,reference,torch", help="exact-engine implementations to time ('' for none)")
    parser.add_argument("--impl-bytes", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for path in args.files:
            for predictor in filter(None, args.predictors.split(",")):
                for engine in filter(None, args.engines.split(",")):
                    row = measure(path, args.bytes, engine, predictor == "llm-only", args.threads, Path(folder))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    from nacrith.exact import kernel

    implementations = [name for name in args.impls.split(",") if name]
    levels = {"simd": 0, "scalar": 0, "avx2": 1, "vnni": 2}
    implementations = [name for name in implementations if name in ("reference", "torch") or (kernel.available() and kernel.best_simd() >= levels[name])]
    rates = implementation_rates(args.files[0], args.impl_bytes, implementations, args.threads) if implementations else []
    for row in rates:
        print(json.dumps(row), flush=True)
    import shlex

    result = {"date": datetime.date.today().isoformat(), "command": "python bench/engines.py " + shlex.join(sys.argv[1:]),
              "machine": machine(), "rows": rows, "implementations": rates}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"engines-{args.tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"engines-{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
