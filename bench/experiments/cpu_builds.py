"""Two llama.cpp CPU builds side by side: do their logits, files and speeds agree?

Each build is a Python interpreter whose llama-cpp-python was compiled with other flags (a
virtual environment each: `make install` builds it portable, GGML_NATIVE off; `make
install-native` for every feature of this CPU). nacrith itself comes from this checkout in
both. For each build, in its own processes:
  - the logits of 40 lockstep steps of 4 streams of TEXT (one context, as compression runs);
  - the compression of the first --bytes of TEXT (default level), timed as a whole process,
    the two builds taking turns --repeat times;
  - decoding its own file and the other build's file (with --any-cpu-build, so that the
    logits, not the recorded build, decide).
Writes bench/results/cpu-builds-<tag>.json.

    python bench/cpu_builds.py --a .venv/bin/python --b /tmp/native/bin/python \\
        corpora/data/alice29.txt --bytes 20000 --tag cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, ROOT, run_process, succeeded  # noqa: E402

STEPS, STREAMS, WINDOW = 40, 4, 256

CHILD = """
import sys, numpy as np
from nacrith.engine import cpu_build
from nacrith.session import Session
text, out = open(sys.argv[1], "rb").read(), sys.argv[2]
session = Session(engine="llama.cpp")  # (the builds compared are llama.cpp's)
tokens = session.tokenizer.encode(text[:8000])
per = len(tokens) // {streams}
context = session.context({streams}, {window})
context.reset()
rows = [np.array(context.step(np.array([tokens[i * per + step] for i in range({streams})], np.int32),
                              np.full({streams}, step, np.int32))) for step in range({steps})]
np.save(out, np.stack(rows))
print(cpu_build())
""".format(streams=STREAMS, window=WINDOW, steps=STEPS)


def logits(python: str, text: Path, out: Path) -> str:
    return succeeded(run_process(python, ["-c", CHILD, str(text), str(out)])[1]).decode().strip()


def compress(python: str, source: Path, target: Path) -> float:
    seconds, done = run_process(python, ["-m", "nacrith.cli", "-q", "-f", "-o", str(target), str(source)])
    succeeded(done)
    return seconds


def decodes(python: str, packed: Path, original: bytes) -> str:
    _, done = run_process(python, ["-m", "nacrith.cli", "-d", "-c", "--any-cpu-build", str(packed)])
    if done.returncode == 0:
        return "exact" if done.stdout == original else "WRONG BYTES"
    return "refused: " + done.stderr.decode(errors="replace").strip().removeprefix("nacrith: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", type=Path)
    parser.add_argument("--a", required=True, help="the Python of build A")
    parser.add_argument("--b", required=True, help="the Python of build B")
    parser.add_argument("--bytes", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    pythons = {"a": args.a, "b": args.b}
    with tempfile.TemporaryDirectory(prefix="nacrith-builds-") as name:
        folder = Path(name)
        source = folder / "sample.txt"
        original = args.text.read_bytes()[: args.bytes]
        source.write_bytes(original)
        builds = {key: logits(python, args.text, folder / f"{key}.npy") for key, python in pythons.items()}
        a, b = np.load(folder / "a.npy"), np.load(folder / "b.npy")
        seconds = {key: [] for key in pythons}
        for _ in range(args.repeat):  # in turn, so that the machine's drift falls on both
            for key, python in pythons.items():
                seconds[key].append(compress(python, source, folder / f"{key}.nc"))
        sizes = {key: (folder / f"{key}.nc").stat().st_size for key in pythons}
        decoding = {f"{reader} decodes {maker}'s file": decodes(pythons[reader], folder / f"{maker}.nc", original)
                    for reader in pythons for maker in pythons}
    result = {
        "text": args.text.name, "bytes": args.bytes, "builds": builds, "pythons": pythons,
        "logits": {"steps": STEPS, "streams": STREAMS, "identical": bool(np.array_equal(a, b)),
                   "max_abs_difference": float(np.abs(a - b).max()),
                   "rows_differing": int((a != b).any(axis=2).sum()), "rows": int(a.shape[0] * a.shape[1])},
        "compressed_bytes": sizes, "compress_seconds": seconds,
        "median_seconds": {key: statistics.median(value) for key, value in seconds.items()},
        "decoding": decoding,
    }
    print(json.dumps(result, indent=1))
    out = RESULTS / f"cpu-builds-{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
