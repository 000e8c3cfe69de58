"""A/B two builds of nacrith's C kernel on stored logits, step by step in one process.

On a shared VM the speed of the same code drifts by up to 30% from one run to the next, so
two builds timed in separate runs cannot be compared to a few percent. This replays the
first ``--tokens`` stored logits rows (``bench/experiments/hidden_replay.py dump FILE``) through two
copies of the default ensemble and the int24 coder at once, encoding and then decoding, one with this checkout's
kernel and one with the kernel at ``--other`` (a built ``_kernels*.so``, for instance from
a ``git worktree`` of the commit to compare with), alternating the two at every lockstep
step (which one goes first alternates by blocks of steps), so that both see the same drift. Each kernel call is timed in CPU time of the calling
thread (time stolen by other guests counts less). Prints, per build and direction, the
kernel's CPU microseconds per token and the median over blocks of steps of the ratio
this/other, and the coded bytes' hashes (equal when both builds compute the same bits);
each build decodes its own code and must give back the stored tokens. Appends to
bench/results/kernel-ab.json. Usage:
    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    python bench/kernel_ab.py bible.txt.256s.240000b --other /tmp/old/nacrith/_kernels*.so --tokens 24200 --tag "..."
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import TimedKernels, append_results, machine, stored_steps  # noqa: E402

from nacrith import coder as coder_module  # noqa: E402
from nacrith.coder import make_decoder, make_encoder  # noqa: E402
from nacrith.predictors import EnsembleConfig, EnsemblePredictor  # noqa: E402
from nacrith.predictors import ensemble as ensemble_module  # noqa: E402
from nacrith.predictors import llm as llm_module  # noqa: E402

MODULES = (llm_module, ensemble_module, coder_module)


def load_kernels(path: str):
    """The extension module built at path, loaded beside this checkout's (not in sys.modules)."""
    spec = importlib.util.spec_from_file_location("nacrith._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--other", required=True, help="the other build's _kernels*.so (a glob is expanded)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nacrith-replay"))
    parser.add_argument("--tokens", type=int, default=12000)
    parser.add_argument("--block", type=int, default=20, help="steps per block for the ratio's median")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    others = glob.glob(args.other)
    if llm_module._kernels is None or len(others) != 1:
        print("need this checkout's kernel built and exactly one --other build", file=sys.stderr)
        return 1
    rows, running, symbols, meta = stored_steps(args.dir, args.file, args.tokens)
    kernels = {"this": llm_module._kernels, "other": load_kernels(others[0])}
    tokens = int(running.sum())
    result = {"tag": args.tag, "machine": machine(), "file": args.file, "tokens": tokens, "other": others[0]}
    codes = {}
    for phase in ("encode", "decode"):
        sides = {name: TimedKernels(module, time.thread_time) for name, module in kernels.items()}
        runs = {}
        for name, timed in sides.items():
            _use(timed)
            predictor = EnsemblePredictor(rows.shape[1], int(running[0]), EnsembleConfig(), list(meta["pieces"]))
            predictor.use_int24_rows(True)  # the fused step, as the lockstep loop runs it
            coder = make_encoder("int24") if phase == "encode" else make_decoder(codes[name], "int24")
            runs[name] = (predictor, coder)
        block_seconds = {name: [] for name in sides}
        start = 0
        for step, n in enumerate(map(int, running)):
            order = list(sides.items())
            if (step // args.block) % 2:  # the second build to run a step finds its logits in the cache: take turns
                order.reverse()
            for name, timed in order:
                _use(timed)
                predictor, coder = runs[name]
                want = predictor.want_logits(n)
                step_rows = rows[start:start + n] if want is None else np.ascontiguousarray(rows[start:start + n][want.astype(bool)])
                probabilities = predictor.probabilities(step_rows, n)
                if phase == "encode":
                    coder.encode(symbols[start:start + n], probabilities)
                    predictor.update(symbols[start:start + n])
                else:
                    decoded = coder.decode(probabilities)
                    if not np.array_equal(decoded, symbols[start:start + n]):
                        raise SystemExit(f"{name} build decoded step {step} wrongly")
                    predictor.update(decoded)
                if step % args.block == args.block - 1 or step == len(running) - 1:
                    block_seconds[name].append(timed.total - sum(block_seconds[name]))
            start += n
        ratios = [a / b for a, b in zip(block_seconds["this"], block_seconds["other"]) if b > 0]
        result.update({f"{phase}_this_us_per_token": round(sides["this"].total / tokens * 1e6, 1),
                       f"{phase}_other_us_per_token": round(sides["other"].total / tokens * 1e6, 1),
                       f"{phase}_median_block_ratio": round(statistics.median(ratios), 3)})
        if phase == "encode":
            codes = {name: runs[name][1].finish() for name in sides}
            result.update({f"{name}_sha256": hashlib.sha256(code).hexdigest()[:16] for name, code in codes.items()})
    _use(kernels["this"])
    print(json.dumps(result))
    append_results("kernel-ab.json", [result])
    return 0


def _use(kernels) -> None:
    """Make nacrith's modules call ``kernels``."""
    for module in MODULES:
        module._kernels = kernels


if __name__ == "__main__":
    sys.exit(main())
