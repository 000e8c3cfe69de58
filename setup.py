"""Build of nacrith's optional C kernels (everything else is in pyproject.toml).

The extension is optional: without a C compiler the install still succeeds and nacrith
uses the numpy code that computes the same bits (nacrith/predictors/llm.py and ensemble.py).
"""
import sys

from setuptools import Extension, setup

# No FMA contraction and no fast-math: the kernels must round exactly as numpy does.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(ext_modules=[Extension("nacrith._kernels", ["nacrith/_kernels.c"], extra_compile_args=FLAGS, optional=True)])
