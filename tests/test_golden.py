"""Containers made earlier, by another machine and another nacrith, still decode exactly.

tests/data/golden/v<version>[-<model>[-<attention>]]/ holds containers written by
tests/data/make_golden.py with the portable CPU build of `make install`. Each must decode to
its original here; a file of the current format must also be what this nacrith writes again
with the options its manifest lists (the model and attention mode among them), byte for
byte, so that an unversioned change of the encoder (or of llama.cpp's arithmetic) fails
here before it strands users' files. A build of
other arithmetic (`make install-native`, CUDA) cannot decode them exactly by design and
skips, saying why; one that differs only in threading (no OpenMP) decodes them, and skips
the byte-for-byte part, its header naming itself. A file whose model is not installed skips.

Folders named ``...-exact-spec<N>`` hold files of the exact engine: they name no build, so
every machine decodes them and writes them again byte for byte, with every implementation
of the engine (NACRITH_EXACT_IMPL).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nacrith import container as fmt
from nacrith import compat
from nacrith import model as model_files
from nacrith.attention import default_attention
from nacrith.errors import BackendMismatchError, ModelNotFoundError
from nacrith.exact import kernel
from nacrith.exact.reference import SPEC_VERSION

from .conftest import pack, unpack


@pytest.fixture(scope="module")
def session(llama_session):
    """The golden files of llama.cpp decode and are rewritten with a llama.cpp session."""
    return llama_session

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
EXACT_IMPLEMENTATIONS = ["reference"] + [name for name, level in (("scalar", 0), ("avx2", 1), ("vnni", 2))
                                         if kernel.available() and kernel.best_simd() >= level]


def golden_cases() -> list:
    cases = []
    for manifest in sorted(GOLDEN.glob("v*/manifest.json")):
        for name, entry in json.loads(manifest.read_text()).items():
            cases.append(pytest.param(manifest.parent / name, entry, id=f"{manifest.parent.name}/{name}"))
    return cases


def of_the_current_format(case) -> bool:
    folder = case.id.split("/")[0]
    return folder == f"v{fmt.VERSION}" or folder.startswith(f"v{fmt.VERSION}-")


def is_exact(case) -> bool:
    return "-exact-spec" in case.id.split("/")[0]


def test_there_are_golden_containers_of_the_current_format_and_defaults():
    names = {case.id for case in golden_cases()}
    for current in (f"v{fmt.VERSION}-{model_files.DEFAULT_MODEL}-{default_attention('cpu')}",
                    f"v{fmt.VERSION}-{model_files.DEFAULT_MODEL}-exact-spec{SPEC_VERSION}"):
        assert {f"{current}/{name}" for name in ("default.nc", "llm-only.nc", "small-window.nc", "mixed.nc")} <= names


def skip_unless_installed(blob: bytes):
    """Skip where the model the file names is not installed here."""
    try:
        compat.check_decodable(fmt.parse(blob))
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    except BackendMismatchError:
        pass


def skip_unless_decodable_here(blob: bytes):
    """Skip where nacrith refuses the file up front as made by a build of other arithmetic
    (:func:`nacrith.compat.check_decodable`'s own verdict and reason)."""
    try:
        compat.check_decodable(fmt.parse(blob))
    except BackendMismatchError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize(("path", "entry"), [case for case in golden_cases() if not is_exact(case)])
def test_golden_container_decodes_to_its_original(session, path, entry):
    blob = path.read_bytes()
    skip_unless_installed(blob)
    skip_unless_decodable_here(blob)
    assert unpack(session, blob) == (GOLDEN / entry["original"]).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("implementation", EXACT_IMPLEMENTATIONS)
@pytest.mark.parametrize(("path", "entry"), [case for case in golden_cases() if is_exact(case)])
def test_exact_golden_container_decodes_with_every_implementation(monkeypatch, path, entry, implementation):
    from nacrith import pipeline

    blob = path.read_bytes()
    skip_unless_installed(blob)
    monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
    assert pipeline.decompress(blob) == (GOLDEN / entry["original"]).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(("path", "entry"), [case for case in golden_cases() if of_the_current_format(case)])
def test_golden_container_of_the_current_format_is_what_nacrith_writes(session, path, entry):
    blob = path.read_bytes()
    model = model_files.ZOO[entry["options"]["model"]]
    if model_files.zoo_path(model) is None:
        pytest.skip(f"{model.name} is not installed")
    options = {"engine": "llama.cpp", **entry["options"]}  # manifests made before engines were named are llama.cpp's
    recorded = fmt.parse(blob).header.model.backend
    if options["engine"] == "llama.cpp" and recorded != compat.cpu_backend():  # the header would name this build
        pytest.skip(f"made by the llama.cpp build {recorded}; this one records {compat.cpu_backend()}")
    if isinstance(options.get("ensemble"), str):  # a preset by name
        from nacrith.predictors.ensemble import PRESETS

        options["ensemble"] = PRESETS[options["ensemble"]]
    assert pack(session, (GOLDEN / entry["original"]).read_bytes(), **options) == blob


def test_mixed_golden_container_holds_text_and_binary_segments():
    for manifest in GOLDEN.glob("v*/manifest.json"):
        (block,) = fmt.parse((manifest.parent / "mixed.nc").read_bytes()).blocks
        assert [length for is_text, length in block.segments if not is_text] == [160]  # the binary run, whole
        assert all(is_text for is_text, _ in block.segments[::2])
