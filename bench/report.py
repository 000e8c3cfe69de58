"""Write docs/benchmarks.md from the results in bench/results.

Each section of the page answers one question with the tables a bench script wrote
(markdown results are embedded as they are, JSON results turned into tables here), and names
the command that made them, the machine it ran on (as the result file records it) and the
date (the result's own, else the date of the commit that added the file). Nothing on the
page is typed in by hand: rerun a benchmark, then this script.

    python bench/report.py            # rewrite docs/benchmarks.md
    python bench/report.py --check    # exit 1 if docs/benchmarks.md is not what it would write
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


@dataclass
class Result:
    """One result file of a section: ``path`` under bench/results, the ``command`` that wrote it,
    and for JSON, ``columns`` (label -> key path, dots for nesting) of ``rows`` (a key path to a
    list of rows; "" for the file itself when it is a list, "." for one row: the file)."""

    path: str
    command: str
    columns: dict = field(default_factory=dict)
    rows: str = "rows"
    note: str = ""


@dataclass
class Section:
    title: str
    question: str
    results: list


def _git_date(path: Path) -> str:
    run = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], capture_output=True, text=True, cwd=ROOT)
    return run.stdout.strip() or "not yet committed"


def _get(row, dotted: str):
    value = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value)
    return str(value).replace("|", "\\|")


def _machine_and_date(path: Path, data) -> tuple[str, str]:
    machine = date = None
    if path.suffix == ".json":
        head = data[0] if isinstance(data, list) and data else data
        if isinstance(head, dict):
            machine, date = head.get("machine"), head.get("date")
    else:
        found = re.search(r"Machine: (.*?)\.?$", data, re.MULTILINE)
        machine = found.group(1) if found else None
        found = re.search(r"^# .*\((\d{4}-\d\d-\d\d)\)$", data, re.MULTILINE)
        date = found.group(1) if found else None
    return machine or "not recorded in the file", date or _git_date(path)


def _markdown_body(text: str) -> str:
    """A markdown result without its title and machine line (the page names those)."""
    lines = [line for line in text.splitlines() if not line.startswith("# ") and not line.startswith("Machine: ")
             and not line.startswith("Command: ")]
    body = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", body)


def _json_table(data, result: Result) -> str:
    rows = data if result.rows == "" else [data] if result.rows == "." else _get(data, result.rows) or []
    header = "| " + " | ".join(result.columns) + " |"
    rule = "|" + "|".join("---" for _ in result.columns) + "|"
    body = ["| " + " | ".join(_cell(_get(row, key)) for key in result.columns.values()) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def render_result(result: Result) -> str:
    path = RESULTS / result.path
    data = json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()
    machine, date = _machine_and_date(path, data)
    table = _json_table(data, result) if path.suffix == ".json" else _markdown_body(data)
    lines = [f"`{result.command}` → `bench/results/{result.path}`  ", f"Machine: {machine}  ", f"Date: {date}", "", table]
    if result.note:
        lines += ["", result.note]
    return "\n".join(lines)


CPU = "2-core x86-64 VM with AVX-512 VNNI"
SECTIONS = [
    Section("Canterbury corpus, llama.cpp engine", "How small is each file of the Canterbury corpus, against gzip, bzip2, xz and zstd? "
            "Level 5, one worker, the default model, llama.cpp's portable CPU build, attention \"off\".", [
        Result("corpus-small-q8-off.md", "python bench/corpus.py corpora/data/{xargs.1,grammar.lsp,fields.c,cp.html,sum} --tag small-q8-off"),
        Result("corpus-canterbury-rest-q8-off.md",
               "python bench/corpus.py corpora/data/{kennedy.xls,ptt5,asyoulik.txt,alice29.txt,lcet10.txt,plrabn12.txt} --tag canterbury-rest-q8-off"),
    ]),
    Section("Engines", "What do the exact engine's integers cost in bits, and what do they gain in speed, against llama.cpp? "
            f"Each run a fresh process, model loading included; {CPU}.", [
        Result("engines-cpu-whole.md", "python bench/engines.py --bytes 0 --predictors ensemble --tag cpu-whole"),
        Result("engines-cpu-40k.md", "python bench/engines.py --bytes 40000 --tag cpu-40k"),
        Result("engines-cpu-impls.md", "python bench/engines.py --engines '' --impl-bytes 8000 --tag cpu-impls"),
        Result("throughput-cpu-llama.json", "python bench/throughput.py corpora/data/alice29.txt --bytes 20000 --engine llama.cpp --tag cpu-llama",
               {"engine": "backend", "tokens": "tokens", "streams": "streams", "raw tok/s": "raw_tok_s", "compress tok/s": "compress_tok_s",
                "decompress tok/s": "decompress_tok_s"}, rows=""),
        Result("throughput-cpu-exact.json", "python bench/throughput.py corpora/data/alice29.txt --bytes 20000 --engine exact --tag cpu-exact",
               {"backend": "backend", "tokens": "tokens", "streams": "streams", "raw tok/s": "raw_tok_s", "compress tok/s": "compress_tok_s",
                "decompress tok/s": "decompress_tok_s"}, rows=""),
    ]),
    Section("A busy machine", "How much slower does compression get when other processes keep every core busy?", [
        Result("loaded-cpu.json", "python bench/loaded.py --bytes 20000 --tag cpu",
               {"engine": "engine", "alone: wall s": "alone.wall_s", "alone: CPU s": "alone.cpu_s", "busy: wall s": "loaded.wall_s",
                "busy: CPU s": "loaded.cpu_s", "wall ratio": "wall_ratio", "CPU ratio": "cpu_ratio", "bytes": "loaded.bytes"}),
    ]),
    Section("Compression levels", "What does each level (`-1` ... `-9`) give in size and speed? The whole file as one block, compression only.", [
        Result("levels-cpu.md", "python bench/levels.py corpora/data/alice29.txt --tag cpu"),
        Result("levels-cpu-fields.c.md", "python bench/levels.py corpora/data/fields.c --levels 1,5,9 --tag cpu-fields.c"),
        Result("levels-cpu-cp.html.md", "python bench/levels.py corpora/data/cp.html --levels 1,5,9 --tag cpu-cp.html"),
    ]),
    Section("Streams x context", "How do the number of lockstep streams and the window trade bits for speed? alice29.txt, compression only.", [
        Result("tradeoff-cpu-v4.md", "python bench/tradeoff.py corpora/data/alice29.txt --pairs 16x1024,4x1024,64x1024,16x512,16x2048,1x1024 --tag cpu-v4"),
        Result("tradeoff-cpu-q8-attention.md", "python bench/tradeoff.py corpora/data/alice29.txt --pairs 16x1024,16x1024:off --tag cpu-q8-attention",
               note="Attention mode (llama.cpp engine): \"off\" against \"stable\" (flash attention)."),
        Result("tradeoff-cpu-q8-attention-lcet10.md", "python bench/tradeoff.py corpora/data/lcet10.txt --pairs 16x1024:off,16x1024 --tag cpu-q8-attention-lcet10"),
        Result("tradeoff-cpu-q8-attention-512.md", "python bench/tradeoff.py corpora/data/alice29.txt --pairs 16x512:off,16x512 --tag cpu-q8-attention-512"),
    ]),
    Section("Ensemble ablation", "What does each part of the ensemble take off, and what does it cost in time?", [
        Result("ablation-cpu-v4.md", "python bench/ablation.py --speed xargs.1 --speed-repeat 7 --speed-pairs 3 --tag cpu-v4"),
        Result("ablation-rest-v4.md",
               'python bench/ablation.py --files grammar.lsp lcet10.txt plrabn12.txt --configs "llm only,all (default)" --tag rest-v4'),
        Result("ablation-v5-cpu.md", 'python bench/ablation.py --files alice29.txt asyoulik.txt --configs "all (default),v5 (integer)" --tag v5-cpu',
               note="Preset v5 (the integer ensemble, `--preset v5`) against v4 (the default) on the same logits; the time is the "
                    "C kernel's on the CPU (on a GPU, PyTorch computes the same integers)."),
    ]),
    Section("Models", "How do the zoo's models compare: smollm2-135m (Q4_1) against smollm2-135m-q8 (Q8_0), and gemma3-270m?", [
        Result("models-cpu-q8-alice29.md",
               "python bench/models.py corpora/data/alice29.txt --bytes 200000 --models smollm2-135m,smollm2-135m-q8 --tag cpu-q8-alice29"),
        Result("models-cpu-alice29-whole.md", "python bench/models.py corpora/data/alice29.txt --bytes 200000 --tag cpu-alice29-whole"),
    ]),
    Section("Memory", "How much memory does a process take, and where does it go?", [
        Result("memory-cpu-v4-segment.md", "python bench/memory.py --text-bytes 20000 --tag cpu-v4-segment"),
        Result("memory-cpu-v4-block-tables.md", "python bench/memory.py --text-bytes 20000 --block-bytes 1048576 --block-texts "
               "corpora/data/bible.txt corpora/data/world192.txt --tag cpu-v4-block-tables"),
    ]),
    Section("Workers", "Do worker processes speed up a multi-block input on 2 cores, and do they change the file?", [
        Result("workers-cpu-q8-off.json", "python bench/workers.py --bytes 30000 --block-size 15000 --tag cpu-q8-off",
               {"workers": "workers", "processes": "processes", "lanes": "lanes", "threads each": "threads_each", "compress s": "compress_s",
                "decompress s": "decompress_s", "bytes": "bytes", "restored": "exact"}),
    ]),
    Section("Ray", "Does coding blocks on Ray actors cost time against local worker processes, and what does one actor code per second? "
            "Whole processes, each starting its own local Ray instance.", [
        Result("ray-cpu.md", "python bench/ray_scaling.py corpora/data/lcet10.txt --tag cpu"),
    ]),
    Section("Many small files", "What does loading the model once for several files save?", [
        Result("many-files-cpu-after.json", "python bench/many_files.py corpora/data/alice29.txt --files 10 --bytes 200 --tag cpu-after",
               {"files": "files", "bytes each": "bytes_per_file", "compressed bytes": "compressed_bytes", "compress s (median)": "median_s.compress",
                "decompress s (median)": "median_s.decompress", "members s (median)": "median_s.members"}, rows="."),
        Result("many-files-cpu-pool-after.json",
               "python bench/many_files.py corpora/data/alice29.txt --files 4 --bytes 400 --block-size 200 --workers 2 --tag cpu-pool-after",
               {"files": "files", "bytes each": "bytes_per_file", "workers": "workers", "compressed bytes": "compressed_bytes",
                "compress s (median)": "median_s.compress", "decompress s (median)": "median_s.decompress"}, rows="."),
    ]),
    Section("GPU", "What does one GPU give? llama.cpp's CUDA build with the model alone and with the ensemble; the exact engine's PyTorch "
            "implementation (same integers as the CPU, not yet fast).", [
        Result("throughput-gpu.json", "bash bench/gpu.sh (python bench/throughput.py corpora/data/bible.txt --gpu --streams 256 --workers W ...)",
               {"file": "file", "bytes": "bytes", "streams": "streams", "workers": "workers", "predictor": "predictor", "raw tok/s": "raw_tok_s",
                "compress tok/s": "compress_tok_s", "decompress tok/s": "decompress_tok_s", "compress KB/s": "compress_KB_s",
                "decompress KB/s": "decompress_KB_s"}, rows=""),
        Result("cpu-vs-gpu-gpu-h200.json", "bash bench/gpu.sh (python bench/cpu_vs_gpu.py corpora/data/bible.txt --bytes 40000 --streams 256 --tag gpu-h200)",
               {"backend": "backend", "bytes": "bytes", "streams": "streams", "predictor": "predictor", "compressed": "compressed",
                "bits/byte": "bpb", "compress s": "compress_s", "restored": "exact"}),
        Result("gpu-exact-h200.json", "python bench/gpu_exact.py",
               {"streams": "streams", "mode": "mode", "positions": "positions", "tokens/s": "tok_s", "ms per step": "ms_per_step",
                "peak GB": "peak_gb"}, rows="rates",
               note="Digests of 40 steps: GPU eager, GPU CUDA graph, the GPU machine's CPU and the C kernel on the x86-64 VM all equal "
                    "(`gpu_equals_cpu`, `gpu_equals_expect` in the file); batch invariant."),
    ]),
]


def page() -> str:
    parts = ["# Benchmarks", "",
             "Generated by `python bench/report.py` from `bench/results/`; do not edit by hand. Each table names the command that "
             "wrote it, the machine it ran on and the date. Earlier and superseded results, and one-off experiments, are in "
             "`bench/experiments/` (its README says what each answered).", ""]
    parts += ["Contents: " + ", ".join(f"[{section.title}](#{re.sub(r'[^a-z0-9 -]', '', section.title.lower()).replace(' ', '-')})"
                                       for section in SECTIONS), ""]
    for section in SECTIONS:
        parts += [f"## {section.title}", "", section.question, ""]
        for result in section.results:
            parts += [render_result(result), ""]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md differs from what this script writes")
    args = parser.parse_args()
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            sys.exit("docs/benchmarks.md is out of date: run python bench/report.py")
        return
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
