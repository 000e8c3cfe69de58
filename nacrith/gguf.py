"""What the parent process reads from a GGUF file's header without loading the model.

Worker planning (:mod:`nacrith.workers`) sizes each context's KV cache before any worker
has loaded the model: :func:`kv_cell_bytes` reads the layer and head counts from the
header's key-value metadata (GGUF v2 and v3, little-endian). It reads the whole key-value
section, the tokenizer's vocabulary included (62-67 ms in two timings for SmolLM2-135M's 49152
tokens), because optional keys may come anywhere, and returns None for anything it cannot
read (the caller then uses a bound).
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAGIC = b"GGUF"
KV_CELL_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type, f16, which nacrith does not change
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 1 << 16  # sanity bounds against damaged headers
_MAX_VALUE_BYTES = 1 << 28


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_exact(handle: BinaryIO, size: int, part: str = "header") -> bytes:
    """``size`` bytes of ``handle``; :class:`GGUFFormatError` if fewer are left (the message
    names ``part``, the part of the file being read) or ``size`` is implausible for one read."""
    if size > _MAX_VALUE_BYTES:  # before reading: a damaged length would allocate that much
        raise GGUFFormatError("implausible GGUF value size")
    data = handle.read(size)
    if len(data) != size:
        raise GGUFFormatError(f"truncated GGUF {part}")
    return data


def read_struct(handle: BinaryIO, code: str):
    """One value of the :mod:`struct` format ``code`` (a single little-endian item)."""
    return struct.unpack(code, read_exact(handle, struct.calcsize(code)))[0]


def read_string(handle: BinaryIO) -> str:
    """A GGUF string: u64 length, then UTF-8 bytes (undecodable bytes replaced)."""
    return read_exact(handle, read_struct(handle, "<Q")).decode("utf-8", "replace")


def read_value(handle: BinaryIO, kind: int):
    """A key's value of GGUF value type ``kind``: a number, a string, or a list for an array."""
    if kind in _SCALARS:
        return read_struct(handle, _SCALARS[kind])
    if kind == _STRING:
        return read_string(handle)
    if kind == _ARRAY:
        item_kind, count = read_struct(handle, "<I"), read_struct(handle, "<Q")
        if item_kind in _SCALARS:  # read whole: per-layer head counts are arrays of a few dozen
            size = struct.calcsize(_SCALARS[item_kind])
            return list(struct.unpack(f"<{count}{_SCALARS[item_kind][1]}", read_exact(handle, size * count)))
        return [read_value(handle, item_kind) for _ in range(count)]
    raise GGUFFormatError(f"unknown GGUF value type {kind}")


def read_preamble(handle: BinaryIO) -> tuple[int, int, int]:
    """(GGUF version, tensor count, key count) of the file ``handle``, read from its start;
    the key-value section follows."""
    if read_exact(handle, 4) != MAGIC:
        raise GGUFFormatError("not a GGUF file")
    version = read_struct(handle, "<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported")
    n_tensors, n_keys = read_struct(handle, "<Q"), read_struct(handle, "<Q")
    if n_keys > _MAX_KEYS:
        raise GGUFFormatError("implausible GGUF key count")
    return version, n_tensors, n_keys


def read_metadata(path: str | os.PathLike) -> dict:
    """Every key-value pair of the header (arrays as lists)."""
    with open(path, "rb") as handle:
        _, _, n_keys = read_preamble(handle)
        metadata = {}
        for _ in range(n_keys):
            key, kind = read_string(handle), read_struct(handle, "<I")
            metadata[key] = read_value(handle, kind)
    return metadata


def header_facts(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """(:func:`kv_cell_bytes`, :func:`vocab_size`) from one read of the header."""
    try:
        meta = read_metadata(path)
    except (OSError, GGUFFormatError, struct.error):
        return None, None
    tokens = meta.get("tokenizer.ggml.tokens")
    return _kv_cell_bytes_of(meta), len(tokens) if isinstance(tokens, list) else None


def kv_cell_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of KV cache per token cell (keys and values of every layer, f16), or None if unknown."""
    return header_facts(path)[0]


def vocab_size(path: str | os.PathLike) -> int | None:
    """The number of tokens in the model's vocabulary, or None if unknown."""
    return header_facts(path)[1]


def _kv_cell_bytes_of(meta: dict) -> int | None:
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        return None
    prefix = architecture + "."
    try:
        layers = int(meta[prefix + "block_count"])
        heads = meta[prefix + "attention.head_count"]
        kv_heads = meta.get(prefix + "attention.head_count_kv", heads)
        heads = max(heads) if isinstance(heads, list) else int(heads)
        kv_heads = max(kv_heads) if isinstance(kv_heads, list) else int(kv_heads)
        head_size = int(meta[prefix + "embedding_length"]) // max(1, heads)
        key_size = int(meta.get(prefix + "attention.key_length", head_size))
        value_size = int(meta.get(prefix + "attention.value_length", head_size))
    except (KeyError, TypeError, ValueError):
        return None
    return layers * kv_heads * (key_size + value_size) * KV_CELL_ELEMENT_BYTES
