"""The exact engine in numpy: the specification (docs/exact-engine.md) written as code.

Every value is an integer; every operation is exact integer arithmetic with the roundings
the specification names. The C kernel (:mod:`nacrith.exact.kernel`) computes the same
integers faster; tests/test_exact.py checks that they agree on every step.

Fixed-point conventions: a vector "at F" holds ``value * 2^F`` as integers. The residual
stream and every activation between matrix products are int32 at :data:`F` (14) fractional
bits, saturated to ±(2^31 - 1). A matrix product's input is quantised per token to
:data:`ACT_BITS`-bit integers with a power-of-two scale (:func:`quantize`); its output is
rescaled per row and token by :func:`matmul`.

Matrix products here go through float64 BLAS (``@``): every product of an int8 weight and
an activation of at most 2^13 and every partial sum of a row (at most 2^31) is an integer
far below 2^53, so float64 holds each one exactly, in any summation order.
"""
from __future__ import annotations

import math

import numpy as np

from . import tables
from .weights import ExactWeights, Gain, Matrix

SPEC_VERSION = 1
F = 14  # fractional bits of the residual stream and of activations
ACT_BITS = 13  # matrix-product inputs: |x| <= 2^13 - 1
KV_BITS = 7  # the KV cache: int8, |x| <= 127
PROB_BITS = 14  # attention weights: sum to about 2^14
PROB_MAX = (1 << PROB_BITS) - 1  # ... each at most 2^14 - 1
SCORE_LIMIT = 1 << 47  # attention scores are clamped to +-2^47 (+-2^31 in value)
SCORE_BITS = 16  # attention scores: fixed point at 2^-16
LOG2E = 1549082005  # round(2^30 * log2(e))
INT32_MAX = (1 << 31) - 1
MAX_DISTANCE = INT32_MAX  # score distances below the row's best are clamped here before exp2


# --- primitives ----------------------------------------------------------------------


def rnd(value: np.ndarray, shift) -> np.ndarray:
    """``value / 2^shift`` rounded to nearest, halves up; ``shift`` <= 0 multiplies by
    ``2^-shift``. ``shift`` may be an array (broadcast). Results past 62 bits saturate."""
    value = np.asarray(value, np.int64)
    shift = np.broadcast_to(np.asarray(shift, np.int64), value.shape)
    out = np.empty(value.shape, np.int64)
    right = shift > 0
    s = np.minimum(shift[right], 63)
    v = value[right]
    # (v + 2^(s-1)) >> s without overflow: floor(v / 2^s) plus the rounding bit
    out[right] = (v >> s) + ((v >> (s - 1)) & 1)
    left = ~right
    s = np.minimum(-shift[left], 62)
    v = value[left]
    limit = np.int64(1) << (62 - s)
    out[left] = np.where(v >= limit, np.int64(1) << 62, np.where(v < -limit, -(np.int64(1) << 62), v << s))
    return out


def sat32(value: np.ndarray) -> np.ndarray:
    """Saturate to ±(2^31 - 1)."""
    return np.clip(value, -INT32_MAX, INT32_MAX)


def bit_length(value: np.ndarray) -> np.ndarray:
    """The number of bits of each non-negative int64 (0 for 0)."""
    value = np.asarray(value, np.int64)
    out = np.zeros(value.shape, np.int64)
    v = value.copy()
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= (np.int64(1) << step)
        out += np.where(big, step, 0)
        v = np.where(big, v >> step, v)
    return out + (v > 0)


def quantize(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``values`` (int64, last axis) as integers of at most ``bits`` bits and a
    power of two: ``t = bit_length(max |row|) - bits``, ``q = clamp(rnd(row, t), ±(2^bits - 1))``.

    Returns (q, t): the row is about ``q * 2^t``. A row of zeros has ``t = 0``.
    """
    largest = np.abs(values).max(axis=-1)
    t = bit_length(largest) - bits
    t = np.where(largest == 0, 0, t)
    limit = (1 << bits) - 1
    return np.clip(rnd(values, t[..., None]), -limit, limit), t


def isqrt(value: np.ndarray) -> np.ndarray:
    """``floor(sqrt(value))`` of non-negative int64 below 2^62, exactly (a float64 estimate
    corrected by integer comparisons)."""
    value = np.asarray(value, np.int64)
    r = np.floor(np.sqrt(value.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > value, r - 1, r)
    r = np.where(r * r > value, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= value, r + 1, r)
    return np.where((r + 1) * (r + 1) <= value, r + 1, r)


# --- the model's operations -------------------------------------------------------------


def embed(matrix: Matrix, tokens: np.ndarray) -> np.ndarray:
    """The embedding rows of ``tokens`` at F: ``rnd(q * m, e - F)`` per element."""
    q = matrix.q[tokens].astype(np.int64)
    return sat32(rnd(q * matrix.m[tokens, None], matrix.e[tokens, None] - F))


def rms_scale(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` (at F), ``1 / sqrt(mean(x^2) + eps)`` as (c, k): about ``c * 2^k``,
    with ``c`` in (2^14, 2^15]. A row of zeros (and eps 0) gives c = 0."""
    n = x.shape[-1]
    largest = np.abs(x).max(axis=-1)
    sh = np.maximum(0, bit_length(largest) - 24)
    xs = x >> sh[..., None]
    s = (xs * xs).sum(axis=-1)  # < n * 2^48
    # eps * n * 2^(2F - 2 sh), rounded: eps = em * 2^ee exactly (a float32)
    em, ee = float32_parts(eps)
    e_term = rnd(np.full(sh.shape, em * n, np.int64), -(ee + 2 * F) + 2 * sh)
    d = s + e_term
    zero = d == 0
    d = np.where(zero, 1, d)
    u = (62 - bit_length(d)) // 2
    j = (d << (2 * u)) // n  # d << 2u in [2^60, 2^62)
    r = isqrt(j)
    b = bit_length(r)
    c = (np.int64(1) << (14 + b)) // r
    k = u + F - sh - 14 - b
    return np.where(zero, 0, c), np.where(zero, 0, k)


def kq_of(head_dim: int) -> int:
    """Attention's scale ``KQ = isqrt(floor(2^60 / head_dim))``, about 2^30 / sqrt(head_dim)."""
    return math.isqrt((1 << 60) // head_dim)


def float32_parts(value: float) -> tuple[int, int]:
    """(m, e) with ``value == m * 2^e`` exactly, ``m`` an integer below 2^24 (``value`` a float32)."""
    mantissa, exponent = np.frexp(np.float32(value))
    return int(np.ldexp(mantissa, 24)), int(exponent) - 24


def norm_quantize(x: np.ndarray, gain: Gain, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm with ``gain`` of each row of ``x`` (at F), ready for a matrix product:
    (q, k) with the normalised row about ``q * 2^k``: ``x * G * c`` quantised, where
    ``c * 2^k_norm`` is the row's inverse RMS (:func:`rms_scale`)."""
    c, k_norm = rms_scale(x, eps)
    q, t = quantize(x * gain.G * c[:, None], ACT_BITS)  # < 2^31 * 2^15 * 2^15
    return q, t - F - gain.bits + k_norm


def plain_quantize(x: np.ndarray, fraction: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` (at ``fraction`` bits) ready for a matrix product: (q, k)."""
    q, t = quantize(x, ACT_BITS)
    return q, t - fraction


def matmul(q: np.ndarray, k: np.ndarray, w: Matrix) -> np.ndarray:
    """``W x`` at F for inputs about ``q * 2^k`` (per row of ``q``):
    ``sat32(rnd(acc * m_r, e_r - k - F))`` with ``acc = sum_i W_q[r, i] * q_i``."""
    acc = exact_products(q, w.q)
    return sat32(rnd(acc * w.m[None, :], w.e[None, :] - k[:, None] - F))


_float_weights: dict[int, tuple] = {}  # id(int8 weights) -> (weak reference to them, their float64 copy)


def exact_products(q: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """``q @ wq.T`` exactly (int64), through float64 BLAS (see the module docstring)."""
    import weakref

    key = id(wq)
    entry = _float_weights.get(key)
    if entry is not None and entry[0]() is wq:
        weights = entry[1]
    else:
        weights = wq.astype(np.float64)
        if wq.size > (1 << 16):  # kept while the weights live: converting is the slow part
            _float_weights[key] = (weakref.ref(wq, lambda _, key=key: _float_weights.pop(key, None)), weights)
    return (q.astype(np.float64) @ weights.T).astype(np.int64)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
    """Rotate the first ``n_rot`` values of each head (last axis) in pairs (2j, 2j+1) by
    the table rows ``cos``/``sin`` (one per leading row): ``rnd(a C - b S, 30)``,
    ``rnd(a S + b C, 30)``."""
    out = x.copy()
    a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = rnd(a * cos - b * sin, 30)
    out[..., 1:n_rot:2] = rnd(a * sin + b * cos, 30)
    return out


def exp2_neg(distance: np.ndarray) -> np.ndarray:
    """``2^30 * e^(-d)`` for scores ``d`` >= 0 at 2^-16: ``EXP2[f] >> n`` where
    ``y = min(d, MAX_DISTANCE) * LOG2E`` (2^-46), ``n = y >> 46``, ``f = (y >> 36) & 1023``."""
    y = np.minimum(distance, MAX_DISTANCE) * LOG2E
    n = np.minimum(y >> 46, 63)
    f = (y >> 36) & 1023
    return tables.exp2_table()[f] >> n


def silu_times(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` at 2F: ``rnd(g * SIGMOID[clamp(rnd(g, F - 10))], 30) * u``."""
    index = np.clip(rnd(gate, F - tables.SIGMOID_STEP_BITS), -tables.SIGMOID_RANGE, tables.SIGMOID_RANGE)
    silu = rnd(gate * tables.sigmoid_table()[index + tables.SIGMOID_RANGE], 30)
    return silu * up


# --- lockstep streams ---------------------------------------------------------------------


class ReferenceContext:
    """The exact engine for ``n_streams`` streams of at most ``ctx`` tokens, in numpy."""

    def __init__(self, weights: ExactWeights, n_streams: int, ctx: int):
        h = weights.hyper
        self.w, self.h, self.n_streams, self.ctx = weights, h, n_streams, ctx
        self.cos, self.sin = tables.rope_table(h.rope_base, h.n_rot, ctx)
        shape = (n_streams, h.n_layer, h.n_head_kv, ctx)
        self.k = np.zeros(shape + (h.head_dim,), np.int8)
        self.v = np.zeros(shape + (h.head_dim,), np.int8)
        self.k_exp = np.zeros(shape, np.int64)
        self.v_exp = np.zeros(shape, np.int64)
        self.kq = kq_of(h.head_dim)

    def reset(self) -> None:
        """Forget every stream's tokens."""
        for array in (self.k, self.v, self.k_exp, self.v_exp):
            array[...] = 0

    def slide(self, stream: int, keep: int, drop: int, length: int) -> None:
        """Drop cells ``keep .. keep + drop - 1`` of ``stream`` (of ``length`` filled cells),
        move the later ones down and rotate their keys back by ``drop`` positions."""
        h = self.h
        for array in (self.k, self.v, self.k_exp, self.v_exp):
            array[stream, :, :, keep:length - drop] = array[stream, :, :, keep + drop:length].copy()
        moved = slice(keep, length - drop)
        keys = self.k[stream, :, :, moved].astype(np.int64) << 16
        cos, sin = self.cos[drop], -self.sin[drop]
        rotated = rope(keys, cos, sin, h.n_rot)
        q, t = quantize(rotated, KV_BITS)
        self.k[stream, :, :, moved] = q
        self.k_exp[stream, :, :, moved] += t - 16

    def step(self, tokens: np.ndarray, positions: np.ndarray, want: np.ndarray | None = None) -> np.ndarray:
        """Feed ``tokens[i]`` at cell ``positions[i]`` of stream ``i``; the logits (int64 at
        F, one row per stream with ``want`` true) of each stream's next token."""
        h, w = self.h, self.w
        n = len(tokens)
        tokens = np.asarray(tokens, np.int64)
        positions = np.asarray(positions, np.int64)
        streams = np.arange(n)
        x = embed(w.embedding, tokens)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        group = h.n_head // h.n_head_kv
        for index, layer in enumerate(w.layers):
            q, k = norm_quantize(x, layer["attn_norm"], h.rms_eps)
            query = rope(matmul(q, k, layer["attn_q"]).reshape(n, h.n_head, h.head_dim), cos, sin, h.n_rot)
            key = rope(matmul(q, k, layer["attn_k"]).reshape(n, h.n_head_kv, h.head_dim), cos, sin, h.n_rot)
            value = matmul(q, k, layer["attn_v"]).reshape(n, h.n_head_kv, h.head_dim)
            k8, kt = quantize(key, KV_BITS)
            v8, vt = quantize(value, KV_BITS)
            self.k[streams, index, :, positions] = k8
            self.v[streams, index, :, positions] = v8
            self.k_exp[streams, index, :, positions] = kt - F
            self.v_exp[streams, index, :, positions] = vt - F
            qq, qt = quantize(query, ACT_BITS)  # per head
            out = np.empty((n, h.n_head, h.head_dim), np.int64)
            for s in range(n):
                length = positions[s] + 1
                for kv in range(h.n_head_kv):
                    heads = slice(kv * group, (kv + 1) * group)
                    out[s, heads] = self._attend(qq[s, heads], qt[s, heads] - F, self.k[s, index, kv, :length], self.k_exp[s, index, kv, :length],
                                                 self.v[s, index, kv, :length], self.v_exp[s, index, kv, :length])
            q, k = plain_quantize(out.reshape(n, h.n_embd), F)
            x = sat32(x + matmul(q, k, layer["attn_output"]))
            q, k = norm_quantize(x, layer["ffn_norm"], h.rms_eps)
            gate = matmul(q, k, layer["ffn_gate"])
            up = matmul(q, k, layer["ffn_up"])
            q, k = plain_quantize(silu_times(gate, up), 2 * F)
            x = sat32(x + matmul(q, k, layer["ffn_down"]))
        rows = np.ones(n, bool) if want is None else np.asarray(want, bool)
        q, k = norm_quantize(x[rows], w.output_norm, h.rms_eps)
        return matmul(q, k, w.output)

    def _attend(self, qq, q_exp, keys, k_exp, values, v_exp) -> np.ndarray:
        """One key-value head's attention for its query heads: (heads, head_dim) at F."""
        dots = qq @ keys.astype(np.int64).T  # (heads, L), |dot| < 2^13 * 127 * head_dim
        scores = np.clip(rnd(dots * self.kq, 30 - SCORE_BITS - q_exp[:, None] - k_exp[None, :]), -SCORE_LIMIT, SCORE_LIMIT)
        distance = scores.max(axis=1, keepdims=True) - scores
        e = exp2_neg(distance)
        total = e.sum(axis=1, keepdims=True)  # >= 2^30: the best key's term is EXP2[0]
        inverse = (np.int64(1) << 58) // total
        p = np.minimum((e * inverse) >> (58 - PROB_BITS), PROB_MAX)
        top = v_exp.max()
        weights = p >> np.minimum(top - v_exp, 63)[None, :]
        sums = weights @ values.astype(np.int64)  # (heads, head_dim)
        return sat32(rnd(sums, PROB_BITS - F - top))
