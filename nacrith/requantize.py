"""The default model's Q4_1 weights rewritten as Q8_0: the same model, run faster.

llama.cpp 0.3.36 has no batched CPU kernel for Q4_1 weights: every Q4_1 matrix product
goes row by row through the generic dot product (the log says "cannot be used with
preferred buffer type CPU_REPACK"), while Q8_0 products of several tokens at once go
through llamafile's tinyBLAS. Rewriting SmolLM2-135M-Instruct's 210 Q4_1 tensors as Q8_0
makes a 145 MB file that compressed alice29.txt to the same number of bytes in 17% less
time on a 2-core x86-64 CPU (docs/benchmarks.md, "Models").

The rewrite is done here in numpy, not by llama.cpp's quantizer, so that every machine
writes the same bytes (the result's SHA-256 is pinned in :data:`nacrith.model.ZOO`): each
step below is one IEEE float32 operation, where C code may fuse a multiply and an add or
not depending on how llama.cpp was compiled. The arithmetic is ggml's reference:
``dequantize_row_q4_1`` (``w = q * d + m``) then ``quantize_row_q8_0_ref`` (``d = amax /
127``, ``q = roundf(w / d)`` as ``w * (1 / d)``, the scale stored as float16). Tensors of
other types are copied unchanged; the header's key-value pairs are copied byte for byte
but ``general.file_type``, which becomes 7 (mostly Q8_0).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .gguf import MAGIC, GGUFFormatError, read_exact, read_preamble, read_string, read_struct, read_value

GGML_Q4_1, GGML_Q8_0 = 3, 8
FILE_TYPE_KEY, FILE_TYPE_Q8_0 = "general.file_type", 7
DEFAULT_ALIGNMENT = 32
QK = 32  # weights per block in both formats
COPY_BYTES = 1 << 22  # about this many bytes of tensor data per read while copying (whole blocks)
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])  # 20 bytes
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", QK)])  # 34 bytes
# bytes per block and weights per block of the types a model file may hold
_BLOCKS = {0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32), 8: (34, 32), 9: (36, 32),
           10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256), 15: (292, 256),
           24: (1, 1), 25: (2, 1), 26: (4, 1), 27: (8, 1), 28: (8, 1), 30: (2, 1)}


@dataclass
class Tensor:
    """One tensor's entry in a GGUF header: name, shape, ggml type and data offset."""

    name: bytes
    dims: tuple[int, ...]
    kind: int
    offset: int  # from the start of the data section

    @property
    def weights(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    def nbytes(self, kind: int | None = None) -> int:
        block_bytes, block_weights = _BLOCKS[self.kind if kind is None else kind]
        return self.weights // block_weights * block_bytes


@dataclass
class Layout:
    """Where a GGUF file's parts lie: its raw key-value section, tensors and data."""

    version: int
    n_keys: int
    keys: bytes  # the key-value section as it is in the file
    file_type_at: int | None  # offset of general.file_type's u32 value within ``keys``
    alignment: int
    tensors: list[Tensor]
    data_start: int


def read_layout(handle: BinaryIO) -> Layout:
    """The header of the GGUF file ``handle`` (positioned at its start)."""
    version, n_tensors, n_keys = read_preamble(handle)
    keys_start, file_type_at, alignment = handle.tell(), None, DEFAULT_ALIGNMENT
    for _ in range(n_keys):
        key, kind = read_string(handle), read_struct(handle, "<I")
        at = handle.tell()
        value = read_value(handle, kind)
        if key == FILE_TYPE_KEY and kind == 4:  # u32
            file_type_at = at - keys_start
        elif key == "general.alignment":
            alignment = int(value)
    keys_end = handle.tell()
    tensors = []
    for _ in range(n_tensors):
        name = read_exact(handle, read_struct(handle, "<Q"))
        dims = tuple(read_struct(handle, "<Q") for _ in range(read_struct(handle, "<I")))
        kind, offset = read_struct(handle, "<I"), read_struct(handle, "<Q")
        if kind not in _BLOCKS:
            raise GGUFFormatError(f"tensor type {kind} is not one nacrith can copy")
        tensors.append(Tensor(name, dims, kind, offset))
    data_start = _aligned(handle.tell(), alignment)
    handle.seek(keys_start)
    keys = read_exact(handle, keys_end - keys_start)
    return Layout(version, n_keys, keys, file_type_at, alignment, tensors, data_start)


def _aligned(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


def q4_1_to_q8_0(raw: bytes) -> bytes:
    """Q4_1 blocks (``raw``) as Q8_0 blocks of the same weights, by ggml's reference arithmetic."""
    blocks = np.frombuffer(raw, Q4_1_BLOCK)
    scale = blocks["d"].astype(np.float32)[:, None]
    low = blocks["m"].astype(np.float32)[:, None]
    nibbles = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32)
    weights = nibbles * scale  # two separate roundings, as ggml's C without contraction
    weights += low
    amax = np.abs(weights).max(axis=1, keepdims=True)
    step = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(step == 0, np.float32(0), np.float32(1) / step).astype(np.float32)
    out = np.empty(len(blocks), Q8_0_BLOCK)
    out["d"] = step[:, 0].astype(np.float16)
    out["qs"] = _roundf(weights * inverse).astype(np.int8)
    return out.tobytes()


def _roundf(values: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly, in float32."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    whole += np.floor(np.float32(2) * (magnitude - whole))  # the fraction is exact (Sterbenz)
    return np.copysign(whole, values)


def rewrite_q4_1_as_q8_0(source: BinaryIO, target: BinaryIO) -> None:
    """Write to ``target`` the GGUF file ``source`` with every Q4_1 tensor as Q8_0."""
    layout = read_layout(source)
    keys = bytearray(layout.keys)
    if layout.file_type_at is not None:
        keys[layout.file_type_at:layout.file_type_at + 4] = struct.pack("<I", FILE_TYPE_Q8_0)
    header = bytearray(MAGIC + struct.pack("<IQQ", layout.version, len(layout.tensors), layout.n_keys) + keys)
    offset, placed = 0, []
    for tensor in layout.tensors:
        kind = GGML_Q8_0 if tensor.kind == GGML_Q4_1 else tensor.kind
        header += struct.pack("<Q", len(tensor.name)) + tensor.name + struct.pack("<I", len(tensor.dims))
        header += struct.pack(f"<{len(tensor.dims)}Q", *tensor.dims) + struct.pack("<IQ", kind, offset)
        placed.append((tensor, offset))
        offset = _aligned(offset + tensor.nbytes(kind), layout.alignment)
    header += bytes(_aligned(len(header), layout.alignment) - len(header))
    target.write(header)
    written = 0
    for tensor, at in placed:
        target.write(bytes(at - written))
        source.seek(layout.data_start + tensor.offset)
        written = at + _copy_tensor(source, target, tensor)
    target.write(bytes(offset - written))  # the last tensor's padding, as gguf writers leave it


def _copy_tensor(source: BinaryIO, target: BinaryIO, tensor: Tensor) -> int:
    """Copy ``tensor``'s data from ``source`` (positioned at it) to ``target``, Q4_1 as Q8_0,
    a whole number of blocks at a time; the number of bytes written.

    In pieces of about :data:`COPY_BYTES`, each far under :func:`~nacrith.gguf.read_exact`'s
    bound on one read, which a whole tensor may pass; and the float32 temporaries of a
    Q4_1 piece (6.4 bytes per byte of it, each) stay small. The rewrite is block by block, so
    the pieces do not change the bytes written."""
    block_bytes = _BLOCKS[tensor.kind][0]
    piece = max(1, COPY_BYTES // block_bytes) * block_bytes
    left, written = tensor.nbytes(), 0
    while left:
        size = min(left, piece)
        raw = read_exact(source, size, "tensor data")
        data = q4_1_to_q8_0(raw) if tensor.kind == GGML_Q4_1 else raw
        target.write(data)
        left, written = left - size, written + len(data)
    return written
