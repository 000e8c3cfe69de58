"""The bench scripts still start: each one's imports resolve and its argument parser builds
(``--help``). They run for minutes on the corpora, so nothing else of them runs in the
tests; this catches a script left behind by a change to the package it measures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
WITH_ARGUMENTS = sorted(path.name for path in BENCH.glob("*.py") if ".parse_args()" in path.read_text())  # not common.py: it has no main


def test_the_bench_scripts_are_found():
    assert len(WITH_ARGUMENTS) >= 20 and "corpus.py" in WITH_ARGUMENTS and "common.py" not in WITH_ARGUMENTS


@pytest.mark.parametrize("script", WITH_ARGUMENTS)
def test_bench_script_answers_help(script):
    run = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage:"), run.stdout[:200]


@pytest.mark.parametrize("script", sorted(path.name for path in BENCH.glob("*.sh")))
def test_bench_shell_script_parses(script):
    """bench/gpu.sh runs only on the GPU machine, one try a session: a syntax error there
    would cost that try."""
    run = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
