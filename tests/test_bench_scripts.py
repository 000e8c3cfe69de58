"""The bench scripts still start: each one's imports resolve and its argument parser builds
(``--help``). They run for minutes on the corpora, so nothing else of them runs in the
tests; this catches a script left behind by a change to the package it measures."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# the user benchmarks and the experiments (not common.py: it has no main)
WITH_ARGUMENTS = sorted(str(path.relative_to(ROOT)) for folder in (BENCH, BENCH / "experiments") for path in folder.glob("*.py")
                        if ".parse_args()" in path.read_text())


def test_the_bench_scripts_are_found():
    assert len(WITH_ARGUMENTS) >= 25 and "bench/corpus.py" in WITH_ARGUMENTS and "bench/experiments/profile.py" in WITH_ARGUMENTS
    assert "bench/common.py" not in WITH_ARGUMENTS


@pytest.mark.parametrize("script", WITH_ARGUMENTS)
def test_bench_script_answers_help(script):
    run = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage:"), run.stdout[:200]


@pytest.mark.parametrize("script", sorted(str(path.relative_to(ROOT)) for folder in (BENCH, ROOT / "tools") for path in folder.glob("*.sh")))
def test_bench_shell_script_parses(script):
    """bench/gpu.sh runs only on the GPU machine, one try a session: a syntax error there
    would cost that try."""
    run = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_the_benchmarks_page_is_written_from_the_results(tmp_path):
    """bench/report.py finds every result file it cites and writes a page naming each one's
    command, machine and date."""
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    text = report.page()
    for section in report.SECTIONS:
        assert f"## {section.title}" in text
        for result in section.results:
            assert (report.RESULTS / result.path).exists(), result.path
            assert f"`{result.command}` → `bench/results/{result.path}`" in text
    cited = sum(len(section.results) for section in report.SECTIONS)
    assert len(re.findall(r"^Machine: ", text, re.MULTILINE)) == len(re.findall(r"^Date: \d{4}-\d\d-\d\d$", text, re.MULTILINE)) == cited
