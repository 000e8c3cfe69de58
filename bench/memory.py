"""Peak memory (maximum resident set size) of whole `nacrith` processes.

Two measurements, each a fresh `python -m nacrith.cli` process timed with getrusage:

* a large input (default 100 MB of random bytes, generated on the fly and piped through
  stdin): the parent's streaming path, block by block; its peak must not grow with the
  input size;
* a text input (default: 200 KB of bible.txt) that the model codes: model, context (KV
  cache), predictor tables and the block buffers.

With the default one worker on a small CPU the coding runs inside that process, so its
peak is the whole job's.

``--block-bytes N`` adds a third: the default ensemble's own memory over one whole text
block of N bytes (a full block is 1 MiB), without the model's work: a fresh process
tokenizes the text, cuts it into the block's lockstep streams and runs the predictor and
the int24 coder over every step, with logits rows of zeros in place of the model's. Its
n-gram and match tables grow with the block's tokens whatever the logits; the bias tables
are dense. It reports the process's peak RSS and its RSS before the predictor was made
(the model file mapped, the tokenizer built), so the difference is what one worker's
predictor adds for such a block. Coding a full block with the model takes about an hour on
2 cores; this takes minutes. Usage:
    python bench/memory.py [--random-mb 100] [--text FILE] [--text-bytes 200000] [--block-bytes 1048576 [--block-texts FILE ...]]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine, replay_steps  # noqa: E402


def peak_of(command: list[str], feed) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``command`` fed by ``feed(pipe)``, in a fresh process."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as sink:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=sink)
        feed(process.stdin)
        process.stdin.close()
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak (KiB); worker processes are not counted
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - began


def random_feed(megabytes: int):
    def feed(pipe):
        for _ in range(megabytes):
            pipe.write(os.urandom(1 << 20))
    return feed


def predictor_block(path: Path, nbytes: int) -> dict:
    """In this process: the ensemble and coder over one block of ``path``'s first ``nbytes``."""
    import resource

    import numpy as np

    from nacrith import pipeline
    from nacrith.coder import make_encoder
    from nacrith.predictors import make_predictor, predictor_settings
    from nacrith.session import Session

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    settings = pipeline.Settings()
    session = Session()
    streams = pipeline.lockstep_streams(pipeline.text_tokens(path.read_bytes()[:nbytes], session.tokenizer), settings)
    n_vocab = session.llama.n_vocab
    before = rss_mib()
    predictor = make_predictor(predictor_settings(settings.ensemble), n_vocab, len(streams), session.tokenizer.pieces)
    encoder = make_encoder("int24")
    # the lockstep order: step by step, the streams still running (they end longest first)
    running = np.array([sum(step < len(stream) for stream in streams) for step in range(max(map(len, streams)))])
    symbols = np.array([stream[step] for step, n in enumerate(running) for stream in streams[:n]], np.int32)
    zeros = np.broadcast_to(np.zeros(n_vocab, np.float32), (len(symbols), n_vocab))  # one row, seen as every token's
    began = time.perf_counter()
    for tokens, probabilities in replay_steps(predictor, zeros, running, symbols):
        encoder.encode(tokens, probabilities)
    coded = encoder.finish()
    return {"input": f"{path.name}, first {nbytes} B: one block's predictor (zero logits)", "bytes": nbytes,
            "tokens": int(sum(map(len, streams))), "streams": len(streams), "rss_before_predictor_mib": before,
            "rss_after_mib": rss_mib(), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - began, "coded_bytes": len(coded)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-mb", type=int, default=100)
    parser.add_argument("--text", type=Path, default=ROOT / "corpora" / "data" / "bible.txt")
    parser.add_argument("--text-bytes", type=int, default=200_000)
    parser.add_argument("--block-bytes", type=int, help="also the ensemble's memory over one block of this many bytes of --text")
    parser.add_argument("--block-texts", type=Path, nargs="+", help="with --block-bytes: these texts, each in a fresh process (default: --text)")
    parser.add_argument("--child-block", action="store_true", help=argparse.SUPPRESS)  # the fresh process of --block-bytes
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    if args.child_block:
        print(json.dumps(predictor_block(args.text, args.block_bytes)))
        return 0
    command = [sys.executable, "-m", "nacrith.cli", "compress", "-q", "-c", "-"]
    rows = []
    text = args.text.read_bytes()[: args.text_bytes]
    peak, seconds = peak_of(command, lambda pipe: pipe.write(text))
    rows.append({"input": f"{args.text.name}, first {len(text)} B (model coded)", "bytes": len(text), "peak_mib": peak, "seconds": seconds})
    print(json.dumps(rows[-1]), flush=True)
    peak, seconds = peak_of(command, random_feed(args.random_mb))
    rows.append({"input": f"{args.random_mb} MiB of random bytes (stdin)", "bytes": args.random_mb << 20, "peak_mib": peak, "seconds": seconds})
    print(json.dumps(rows[-1]), flush=True)
    for block_text in (args.block_texts or [args.text]) if args.block_bytes else []:
        child = subprocess.run([sys.executable, __file__, "--child-block", "--text", str(block_text), "--block-bytes", str(args.block_bytes)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Peak memory", "", f"`nacrith compress -c -` in a fresh process, default settings. Machine: {machine()}.", "",
             "| input | bytes | peak RSS MiB | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {row['input']} | {row['bytes']} | {row['peak_mib']:.0f} | {row['seconds']:.1f} |" for row in rows]
    for row in rows:
        if "rss_before_predictor_mib" in row:
            lines += ["", f"{row['input']}: {row['tokens']} tokens in {row['streams']} streams; resident before the predictor "
                      f"{row['rss_before_predictor_mib']:.0f} MiB, after the block {row['rss_after_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"memory-{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"memory-{args.tag}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print(f"wrote {RESULTS}/memory-{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
