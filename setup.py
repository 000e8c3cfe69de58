"""Build of nacrith's optional C kernels (everything else is in pyproject.toml).

Both extensions are optional: without a C compiler the install still succeeds and nacrith
uses the numpy code that computes the same bits (nacrith/predictors/llm.py, ensemble.py and
nacrith/exact/reference.py).
"""
import sys

from setuptools import Extension, setup

# No FMA contraction and no fast-math: the kernels must round exactly as numpy does.
# -fno-math-errno only stops sqrtf from setting errno (never needed: its argument is
# positive), which lets the compiler vectorise the AdaGrad loop; results are unchanged.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
# The exact engine's kernel is integer arithmetic throughout; its SIMD paths are chosen at
# run time (function target attributes), so the build itself targets the baseline CPU.
THREADS = [] if sys.platform == "win32" else ["-pthread"]

setup(ext_modules=[
    Extension("nacrith._kernels", ["nacrith/_kernels.c"], extra_compile_args=FLAGS, optional=True),
    Extension("nacrith.exact._exact", ["nacrith/exact/_exact.c"], extra_compile_args=FLAGS + THREADS, extra_link_args=THREADS, optional=True),
])
