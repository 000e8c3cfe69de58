"""Build of nacrith's optional C kernels (everything else is in pyproject.toml).

The extension is optional: without a C compiler the install still succeeds and nacrith
uses the numpy code that computes the same bits (nacrith/predictors/llm.py and ensemble.py).
"""
import sys

from setuptools import Extension, setup

# No FMA contraction and no fast-math: the kernels must round exactly as numpy does.
# -fno-math-errno only stops sqrtf from setting errno (never needed: its argument is
# positive), which lets the compiler vectorise the AdaGrad loop; results are unchanged.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]

setup(ext_modules=[Extension("nacrith._kernels", ["nacrith/_kernels.c"], extra_compile_args=FLAGS, optional=True)])
