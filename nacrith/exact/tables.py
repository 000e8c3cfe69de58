"""The exact engine's tables: exp2, sigmoid and RoPE rotations, as integers.

Every entry is the exact real value, scaled and rounded to the nearest integer (halves up),
never taken from the C library's ``exp``, ``cos`` or ``sin``, whose last bits differ between
machines. Here they are computed with Python integers alone (fixed-point recurrences carried
to 2^-128, far finer than the 2^-30 the tables keep) from a handful of constants that
Python's :mod:`decimal` gives to 60 digits. ``tests/test_exact.py`` pins each table's SHA-256
(:data:`TABLE_SHA256`) and checks sample entries against direct high-precision evaluation.

* :func:`exp2_table`: ``EXP2[f] = round(2^30 * 2^(-f/1024))`` for ``f`` in 0..1023.
* :func:`sigmoid_table`: ``SIGMOID[i + 16384] = round(2^30 / (1 + e^(-i/1024)))`` for ``i``
  in -16384..16384 (inputs -16 to 16 in steps of 1/1024).
* :func:`rope_table`: ``COS[p][i] = round(2^30 cos(p * theta_i))`` and the same for ``SIN``,
  ``theta_i = base^(-2i/n_rot)``, for positions ``p`` below a window's length.

See docs/exact-engine.md for how the engine uses them.
"""
from __future__ import annotations

import decimal
import functools
import hashlib

import numpy as np

ONE = 1 << 30  # the tables' unit: values are fixed point with 30 fractional bits
EXP2_BITS = 10  # exp2's table covers a fraction of 1/1024 steps
SIGMOID_STEP_BITS = 10  # the sigmoid table's inputs step by 2^-10
SIGMOID_RANGE = 16 << SIGMOID_STEP_BITS  # ... from -16 to +16: 16384 steps each side
_WORK = 128  # fractional bits of the recurrences that fill the tables
_DIGITS = 60  # decimal digits of the constants they start from


def _rnd(value: int, shift: int) -> int:
    """``value / 2^shift`` rounded to the nearest integer, halves up (Python's floor shift)."""
    return (value + (1 << (shift - 1))) >> shift


def _fixed(value: decimal.Decimal) -> int:
    """``value`` as an integer of ``_WORK`` fractional bits, rounded to nearest."""
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        return int((value * (1 << _WORK)).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def _decimal_cos_sin(angle: decimal.Decimal) -> tuple[decimal.Decimal, decimal.Decimal]:
    """cos and sin of a small ``angle`` (|angle| <= 1.5) by their Taylor series, to 60 digits."""
    with decimal.localcontext() as context:
        context.prec = _DIGITS + 10
        cos = sin = decimal.Decimal(0)
        term = decimal.Decimal(1)  # angle^k / k!
        k = 0
        while term != 0 and abs(term) > decimal.Decimal(10) ** -(_DIGITS + 8):
            sign = -1 if (k // 2) % 2 else 1
            if k % 2 == 0:
                cos += sign * term
            else:
                sin += sign * term
            k += 1
            term = term * angle / k
        return +cos, +sin


def _power_sequence(ratio: int, count: int) -> list[int]:
    """``ratio^k`` in ``_WORK``-bit fixed point for k in 0..count-1 (``ratio`` in the same),
    each product rounded to nearest."""
    values, value = [], 1 << _WORK
    for _ in range(count):
        values.append(value)
        value = _rnd(value * ratio, _WORK)
    return values


@functools.lru_cache(maxsize=None)
def exp2_table() -> np.ndarray:
    """int64[1024]: ``round(2^30 * 2^(-f/1024))``."""
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        step = _fixed(decimal.Decimal(2) ** (decimal.Decimal(-1) / (1 << EXP2_BITS)))
    values = _power_sequence(step, 1 << EXP2_BITS)
    return _frozen([_rnd(v, _WORK - 30) for v in values])


@functools.lru_cache(maxsize=None)
def sigmoid_table() -> np.ndarray:
    """int64[32769]: ``round(2^30 / (1 + e^(-x)))`` for ``x = i/1024``, i in -16384..16384."""
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        step = _fixed((decimal.Decimal(-1) / (1 << SIGMOID_STEP_BITS)).exp())
    decays = _power_sequence(step, SIGMOID_RANGE + 1)  # e^(-i/1024), i >= 0, at _WORK bits
    one = 1 << _WORK
    positive = [_divide_rounded(one << 30, one + e) for e in decays]  # sigmoid(i/1024), i >= 0
    negative = [_divide_rounded(e << 30, one + e) for e in decays]  # sigmoid(-i/1024)
    return _frozen(negative[:0:-1] + positive)


def _divide_rounded(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to nearest, halves up (both positive)."""
    return (2 * numerator + denominator) // (2 * denominator)


@functools.lru_cache(maxsize=None)
def rope_frequencies(base_bits: int, n_rot: int) -> tuple[int, ...]:
    """``e^(i theta_j)`` for the ``n_rot // 2`` rotation frequencies, as (cos, sin) pairs of
    ``_WORK``-bit fixed point, flattened; ``base_bits`` is the float32 RoPE base's bit pattern
    (so the exact value, not a rounded decimal, fixes theta)."""
    base = decimal.Decimal(float(np.uint32(base_bits).view(np.float32)))  # exact: a float32 is a finite binary fraction
    pairs = []
    with decimal.localcontext() as context:
        context.prec = _DIGITS + 10
        log_base = base.ln()
        for j in range(n_rot // 2):
            theta = (-(decimal.Decimal(2 * j) / n_rot) * log_base).exp()
            cos, sin = _decimal_cos_sin(theta)
            pairs += [_fixed(cos), _fixed(sin)]
    return tuple(pairs)


@functools.lru_cache(maxsize=8)
def rope_table(base: float, n_rot: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(COS, SIN), int64 arrays ``[positions, n_rot // 2]``: ``round(2^30 cos(p theta_j))``.

    The rotation by ``p`` is the rotation by ``p - 1`` times ``e^(i theta_j)``, both at
    2^-128, rounded to nearest at every step (real and imaginary part); the recurrence's
    error stays below 2^-110, so the entries are the correctly rounded values.
    """
    base_bits = int(np.float32(base).view(np.uint32))
    frequencies = rope_frequencies(base_bits, n_rot)
    half = n_rot // 2
    cos = np.empty((positions, half), np.int64)
    sin = np.empty((positions, half), np.int64)
    for j in range(half):
        wr, wi = frequencies[2 * j], frequencies[2 * j + 1]
        zr, zi = 1 << _WORK, 0
        column_cos, column_sin = [], []
        for _ in range(positions):
            column_cos.append(_rnd(zr, _WORK - 30))
            column_sin.append(_rnd(zi, _WORK - 30))
            zr, zi = _rnd(zr * wr - zi * wi, _WORK), _rnd(zr * wi + zi * wr, _WORK)
        cos[:, j] = column_cos
        sin[:, j] = column_sin
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def _frozen(values: list[int]) -> np.ndarray:
    array = np.asarray(values, np.int64)
    array.flags.writeable = False
    return array


def digest(array: np.ndarray) -> str:
    """SHA-256 (hex) of a table as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(array, "<i8").tobytes()).hexdigest()
