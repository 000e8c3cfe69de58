"""The project's promises about itself: the format document lists the code's tables, the
package has no import circles and loads no llama.cpp for what does not need it, and the
user-facing text narrates no runs."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nacrith import container as fmt

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NARRATION = re.compile(r"this VM|this session|(an|the) (earlier|later) session|earlier sessions|later sessions", re.IGNORECASE)


def test_the_format_document_lists_the_codes_tables():
    text = (DOCS / "format.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (\d+) \| `([^`]*)` \|$", text, re.MULTILINE)
    documented: dict[str, list[str]] = {}
    for field, entry, value in rows:
        documented.setdefault(field, []).append(value)
        assert int(entry) == len(documented[field]), f"{field} entry {entry} out of order"
    assert documented == {field: list(values) for field, values in fmt.TABLES.items()}
    features = re.search(r"<!-- cpu features: nacrith.container.CPU_FEATURES -->\n`([^`]*)`", text)
    assert features and features.group(1).split() == list(fmt.CPU_FEATURES)
    assert f"# The nacrith container format, version {fmt.VERSION}" in text
    for code, name in fmt.BLOCK_KINDS.items():
        assert f"{code} {name}" in text
    for code, name in enumerate(fmt.ATTENTION_CODES):
        assert f'{code} "{name}"' in text


def test_the_format_documents_error_classes_exist():
    from nacrith import errors

    text = (DOCS / "format.md").read_text()
    named = set(re.findall(r"`(\w+Error)`", text))
    assert named and all(isinstance(getattr(errors, name, None), type) for name in named)


def _relative_imports(path: Path, package: str) -> set[str]:
    """The nacrith modules ``path`` imports anywhere in it (functions too), typing-only imports aside."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
                   for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:
                found.update(".".join(base + [alias.name]) for alias in node.names)
    return found


def test_the_package_has_no_import_circles():
    """Not even through imports inside functions: every module's dependencies form a tree
    that never leads back to it (pipeline -> reuse -> workers -> blocks, engine -> devices -> llama)."""
    modules = {}
    for path in (ROOT / "nacrith").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = name.removesuffix(".__init__") if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name.removesuffix(".__init__")] = (path, package)
    graph = {name: {dep for dep in _relative_imports(path, package) if dep in modules} for name, (path, package) in modules.items()}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])


def test_import_nacrith_and_info_load_no_llama_cpp():
    golden = ROOT / "tests" / "data" / "golden" / "v5-smollm2-135m-q8-exact-spec1" / "default.nc"
    code = ("import sys, nacrith, nacrith.cli, nacrith.pipeline\n"
            "assert 'llama_cpp' not in sys.modules, 'import'\n"
            "from click.testing import CliRunner\n"
            f"result = CliRunner().invoke(nacrith.cli.main_group, ['info', {str(golden)!r}])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert 'exact (spec 1)' in result.output, result.output\n"
            "assert 'llama_cpp' not in sys.modules, 'info'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


def _user_text() -> list[tuple[str, str]]:
    texts = [("README.md", (ROOT / "README.md").read_text())]
    texts += [(f"docs/{path.name}", path.read_text()) for path in sorted(DOCS.glob("*.md")) if path.name != "benchmarks.md"]
    for path in sorted((ROOT / "nacrith").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append((f"{path.relative_to(ROOT)}:{getattr(node, 'name', 'module')}", doc))
    return texts


def test_no_runs_are_narrated_in_readme_docs_or_docstrings():
    found = [(where, match.group(0)) for where, text in _user_text() for match in NARRATION.finditer(text)]
    assert not found


def test_help_carries_no_dated_history():
    from click.testing import CliRunner

    from nacrith.cli import main_group as main

    for command in ([], ["compress"], ["decompress"], ["test"], ["info"]):
        output = CliRunner().invoke(main, [*command, "--help"]).output
        assert output.startswith("Usage:"), output[:200]
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", output) and not NARRATION.search(output), output


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320


@pytest.mark.parametrize("name", ["format.md", "exact-engine.md", "design.md", "compatibility.md", "cli.md", "benchmarks.md"])
def test_the_docs_exist_and_their_links_resolve(name):
    text = (DOCS / name).read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (DOCS / target).resolve().exists(), f"{name} links to {target}"
