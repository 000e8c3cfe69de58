"""The exact engine's C kernel (``nacrith/exact/_exact.c``), reached through ctypes.

:class:`KernelModel` packs an :class:`~nacrith.exact.weights.ExactWeights` into the
kernel's layout once (weights + 128 in tiles of 16 rows by 4 columns, row sums); a
:class:`KernelContext` holds one set of lockstep streams and their KV cache in C. Its
``simd`` path is the fastest the CPU has (:func:`best_simd`) unless one is asked for:
every path gives the same integers (tests/test_exact.py).
"""
from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

from . import tables
from .reference import F, float32_parts, kq_of
from .weights import ExactWeights, Matrix

SIMD_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
TILE = 16
_I64, _P = ctypes.c_int64, ctypes.c_void_p


def _library():
    spec = importlib.util.find_spec("nacrith.exact._exact")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    library.nx_simd_available.restype = _I64
    library.nx_context_new.restype = _P
    library.nx_context_new.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I64]
    library.nx_context_free.argtypes = [_P]
    library.nx_reset.argtypes = [_P]
    library.nx_step.restype = _I64
    library.nx_step.argtypes = [_P, _I64, _P, _P, _P, _P]
    library.nx_slide.restype = _I64
    library.nx_slide.argtypes = [_P, _I64, _I64, _I64, _I64]
    return library


_lib = _library()


def available() -> bool:
    """Whether the C kernel was built (it is optional: without a C compiler at install,
    the numpy reference runs instead, computing the same integers)."""
    return _lib is not None


def best_simd() -> int:
    """The fastest path this CPU runs: 2 AVX-512 VNNI, 1 AVX2, 0 scalar."""
    return int(_lib.nx_simd_available()) if _lib is not None else 0


class _Mat(ctypes.Structure):
    _fields_ = [("n_in", _I64), ("n_out", _I64), ("w", _P), ("rowsum", _P), ("m", _P), ("e", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat), ("o", _Mat), ("gateup", _Mat), ("down", _Mat), ("attn_gain", _P), ("ffn_gain", _P),
                ("attn_bits", _I64), ("ffn_bits", _I64)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", _I64), ("n_embd", _I64), ("n_ff", _I64), ("n_head", _I64), ("n_head_kv", _I64), ("head_dim", _I64),
                ("n_rot", _I64), ("n_vocab", _I64), ("eps_m", _I64), ("eps_e", _I64), ("kq", _I64), ("layers", _P),
                ("embd_q", _P), ("embd_m", _P), ("embd_e", _P), ("output", _Mat), ("out_gain", _P), ("out_bits", _I64),
                ("exp2", _P), ("sigmoid", _P)]


def pack(matrices: list[Matrix]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The rows of ``matrices`` (same width) stacked, in the kernel's layout: (packed
    bytes, row sums, m, e, n_in, n_out); rows padded to 16 and columns to 4 with zeros."""
    q = np.concatenate([matrix.q for matrix in matrices])
    m = np.concatenate([matrix.m for matrix in matrices])
    e = np.concatenate([matrix.e for matrix in matrices])
    n_out, n_in = q.shape
    rows, columns = -(-n_out // TILE) * TILE, -(-n_in // 4) * 4
    padded = np.zeros((rows, columns), np.int8)
    padded[:n_out, :n_in] = q
    packed = (padded.astype(np.int16) + 128).astype(np.uint8)
    packed = np.ascontiguousarray(packed.reshape(rows // TILE, TILE, columns // 4, 4).transpose(0, 2, 1, 3))
    rowsum = np.zeros(rows, np.int64)
    rowsum[:n_out] = q.astype(np.int64).sum(axis=1)
    m_pad, e_pad = np.ones(rows, np.int64), np.zeros(rows, np.int64)
    m_pad[:n_out], e_pad[:n_out] = m, e
    return packed, rowsum, m_pad, e_pad, columns, rows


class KernelModel:
    """An :class:`ExactWeights` in the kernel's layout (about the size of the int8 weights)."""

    def __init__(self, weights: ExactWeights):
        if _lib is None:
            raise RuntimeError("the exact engine's C kernel is not built (no C compiler at install?)")
        h = weights.hyper
        if h.head_dim % TILE or h.n_ff % TILE or h.n_head // h.n_head_kv > 16:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError("the exact engine's C kernel needs head and feed-forward sizes that are multiples of 16")
        self.weights = weights
        self._keep = []  # every array the C structures point into
        self.layers = (_Layer * h.n_layer)()
        for index, layer in enumerate(weights.layers):
            target = self.layers[index]
            target.qkv = self._mat([layer["attn_q"], layer["attn_k"], layer["attn_v"]])
            target.o = self._mat([layer["attn_output"]])
            target.gateup = self._mat([layer["ffn_gate"], layer["ffn_up"]])
            target.down = self._mat([layer["ffn_down"]])
            target.attn_gain, target.attn_bits = self._ptr(layer["attn_norm"].G), layer["attn_norm"].bits
            target.ffn_gain, target.ffn_bits = self._ptr(layer["ffn_norm"].G), layer["ffn_norm"].bits
        em, ee = float32_parts(h.rms_eps)
        model = _Model(n_layer=h.n_layer, n_embd=h.n_embd, n_ff=h.n_ff, n_head=h.n_head, n_head_kv=h.n_head_kv, head_dim=h.head_dim,
                       n_rot=h.n_rot, n_vocab=h.n_vocab, eps_m=em, eps_e=ee, kq=kq_of(h.head_dim))
        model.layers = ctypes.cast(self.layers, _P)
        model.embd_q, model.embd_m, model.embd_e = (self._ptr(a) for a in (weights.embedding.q, weights.embedding.m, weights.embedding.e))
        model.output = self._mat([weights.output])
        model.out_gain, model.out_bits = self._ptr(weights.output_norm.G), weights.output_norm.bits
        model.exp2, model.sigmoid = self._ptr(tables.exp2_table()), self._ptr(tables.sigmoid_table())
        self.model = model
        self.output_rows = model.output.n_out

    def _ptr(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        self._keep.append(array)
        return array.ctypes.data

    def _mat(self, matrices: list[Matrix]) -> _Mat:
        packed, rowsum, m, e, n_in, n_out = pack(matrices)
        return _Mat(n_in=n_in, n_out=n_out, w=self._ptr(packed), rowsum=self._ptr(rowsum), m=self._ptr(m), e=self._ptr(e))


class KernelContext:
    """``n_streams`` lockstep streams of at most ``ctx`` cells in the C kernel."""

    def __init__(self, model: KernelModel, n_streams: int, ctx: int, threads: int = 1, simd: int | None = None):
        h = model.weights.hyper
        self.model, self.n_streams, self.ctx = model, n_streams, ctx
        self.simd = best_simd() if simd is None else simd
        self.cos, self.sin = tables.rope_table(h.rope_base, h.n_rot, ctx)
        self.handle = _lib.nx_context_new(ctypes.byref(model.model), n_streams, ctx, self.cos.ctypes.data, self.sin.ctypes.data,
                                          max(1, threads), self.simd)
        if not self.handle:
            raise MemoryError(f"the exact engine could not allocate {n_streams} streams of {ctx} tokens")
        self._logits = np.empty((n_streams, model.output_rows), np.int32)

    def close(self) -> None:
        """Free the context's memory and stop its threads (once; later calls do nothing)."""
        if self.handle:
            _lib.nx_context_free(self.handle)
            self.handle = None

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def reset(self) -> None:
        """Forget every stream's tokens."""
        _lib.nx_reset(self.handle)

    def step(self, tokens: np.ndarray, positions: np.ndarray, want: np.ndarray | None = None) -> np.ndarray:
        """As :meth:`nacrith.exact.reference.ReferenceContext.step`: int32 logits at F, one
        row per stream with ``want`` true (a view, valid until the next call)."""
        n = len(tokens)
        tokens = np.ascontiguousarray(tokens, np.int32)
        positions = np.ascontiguousarray(positions, np.int32)
        wanted = np.ones(n, np.uint8) if want is None else np.ascontiguousarray(want, np.uint8)
        if _lib.nx_step(self.handle, n, tokens.ctypes.data, positions.ctypes.data, wanted.ctypes.data, self._logits.ctypes.data) != 0:
            raise ValueError("the exact engine was given a token, position or stream count out of range")
        return self._logits[: int(np.count_nonzero(wanted)), : self.model.weights.hyper.n_vocab]

    def slide(self, stream: int, keep: int, drop: int, length: int) -> None:
        """As :meth:`nacrith.exact.reference.ReferenceContext.slide`."""
        if _lib.nx_slide(self.handle, stream, keep, drop, length) != 0:
            raise ValueError("bad slide")


__all__ = ["F", "KernelContext", "KernelModel", "SIMD_NAMES", "available", "best_simd"]
