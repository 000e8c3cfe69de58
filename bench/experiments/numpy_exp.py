"""How often numpy's float64 exp gives other bits without its SIMD variants (as on an older CPU).

Runs np.exp on 400,000 values in [-30, 0] (the range of a softmax's shifted inputs) in
this process and in one with NPY_DISABLE_CPU_FEATURES naming every SIMD target numpy
dispatches to on this host, and counts the results that differ; nacrith's portable_exp is
checked the same way. Writes bench/results/numpy-exp-<tag>.json.
Usage: python bench/numpy_exp.py [--tag cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, machine  # noqa: E402

PROBE = """
import json
import numpy as np
from nacrith.predictors.ensemble import portable_exp_array
x = np.random.default_rng(0).uniform(-30.0, 0.0, 400000)
print(json.dumps({"numpy": np.exp(x).tolist(), "portable": portable_exp_array(x).tolist()}))
"""


def dispatched_features() -> list[str]:
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    return [name for name in umath.__cpu_dispatch__ if umath.__cpu_features__.get(name)]


def run(disabled: str) -> dict:
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    import numpy as np

    features = dispatched_features()
    full, plain = run(""), run(",".join(features))
    result = {"machine": machine(), "numpy": np.__version__, "disabled": features, "values": len(full["numpy"])}
    for name in ("numpy", "portable"):
        result[f"{name}_differing"] = sum(a != b for a, b in zip(full[name], plain[name]))
    print(json.dumps(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"numpy-exp-{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
