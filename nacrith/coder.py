"""The range coders: nacrith's "int24" (format version 4) and constriction's (versions 1-3).

One coder serves all the streams of a block: at every lockstep step the symbols of the
active streams are coded in stream order, each with its own row of probabilities. The
decoder knows every row of a step before it decodes any symbol of that step (a row depends
only on earlier symbols of its own stream), so it decodes the whole step in one call.

Probabilities are float64 rows, not necessarily normalised; every symbol gets a nonzero
share, so every token stays codable whatever the model believes. Both coders are
constriction's queue-order range coder (64-bit state, 32-bit words, 24-bit probabilities:
``stream/queue.rs`` of constriction 0.5); they differ in how a row becomes integer
frequencies.

**constriction** (``Categorical(perfect=False)``, files of format versions 1-3) sums each
row in float64 from its first entry to its last, a chain of dependent additions (about
50 us per row of 49152), and holds Python's GIL while it does, so threads cannot share the
work.

**int24** (version 4) quantises a row ``p`` of ``n`` entries with integer sums, whose order
does not matter, so the C kernel can run them at full speed and without the GIL:

1. ``k = 31 - e`` where ``max(p) = f * 2^e`` with ``0.5 <= f < 1`` (``frexp``);
2. ``w_i = trunc((p_i * 2^k1) * 2^(k - k1))`` with ``k1 = min(k, 1000)`` (IEEE multiplications
   by powers of two, the second by 1 unless the row's maximum is below 2^-969, where one
   factor would overflow; the largest ``w_i`` lies in ``[2^30, 2^31)``, so SSE2 converts
   them) and ``S = sum(w_i)``, an exact integer;
3. ``scale = (2^24 - n) / S`` (one IEEE division of two integers converted to float64);
4. ``left(s) = trunc(C_s * scale) + s`` with the exact prefix ``C_s = w_0 + ... + w_(s-1)``
   (converted to float64, one IEEE multiplication), and ``left(n) = 2^24``.

Symbol ``s`` is coded with the interval ``[left(s), left(s + 1))``: at least 1 wide, as the
``+ s`` makes ``left`` strictly increasing. A row must be finite, non-negative and not all
zero, with ``2 <= n < 2^24 - 1`` (a row of NaN logits becomes a row of equal tiny values,
2^-1000, and is coded uniformly). The C kernel
(``nacrith._kernels.int24_encode`` / ``int24_decode``) and the numpy code here compute the
same integers, so a file does not depend on which of them made it (tests/test_units.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import constriction
import numpy as np

from .errors import CorruptError

try:
    from . import _kernels
except ImportError:  # built without a C compiler: the numpy code gives the same bits
    _kernels = None

CODERS = ("constriction", "int24")
DEFAULT_CODER = "int24"
LEGACY_CODER = "constriction"  # the coder of format versions 1-3

PRECISION = 24
TOTAL = 1 << PRECISION
_MASK64 = (1 << 64) - 1
_WORD_MASK = (1 << 32) - 1
_LOW_LIMIT = 1 << 32  # the range never stays below this between symbols
MAX_STEP = 1000  # 2^(31 - e) is applied as 2^min(31 - e, 1000) * 2^rest: one factor could overflow

_FAMILY = constriction.stream.model.Categorical(perfect=False)


def make_encoder(coder: str = DEFAULT_CODER, use_kernel: bool | None = None):
    """A new encoder for ``coder`` (one of :data:`CODERS`)."""
    if coder == "int24":
        return Int24Encoder(use_kernel)
    if coder == "constriction":
        return ConstrictionEncoder()
    raise ValueError(f"unknown range coder {coder!r}")


def make_decoder(data: bytes, coder: str = DEFAULT_CODER, use_kernel: bool | None = None):
    """A decoder of ``data`` made by ``coder``'s encoder."""
    if len(data) % 4:
        raise CorruptError("corrupt container: coded stream length is not a multiple of 4")
    if coder == "int24":
        return Int24Decoder(data, use_kernel)
    if coder == "constriction":
        return ConstrictionDecoder(data)
    raise ValueError(f"unknown range coder {coder!r}")


# --- constriction (format versions 1-3) ---------------------------------------------------


class ConstrictionEncoder:
    """Collects symbols, one row of probabilities each, into a compressed byte string."""

    def __init__(self):
        self._encoder = constriction.stream.queue.RangeEncoder()

    def encode(self, symbols: np.ndarray, probabilities: np.ndarray) -> None:
        """Append ``symbols[i]`` coded with the distribution ``probabilities[i]`` (float64)."""
        self._encoder.encode(np.ascontiguousarray(symbols, np.int32), _FAMILY, probabilities)

    def finish(self) -> bytes:
        """The compressed bytes (little-endian 32-bit words)."""
        return self._encoder.get_compressed().astype("<u4").tobytes()


class ConstrictionDecoder:
    """Reads back what :class:`ConstrictionEncoder` wrote, given the same probability rows."""

    def __init__(self, data: bytes):
        self._decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))

    def decode(self, probabilities: np.ndarray) -> np.ndarray:
        """One symbol per row of ``probabilities``, as int32."""
        try:
            return np.asarray(self._decoder.decode(_FAMILY, probabilities), np.int32)
        except Exception as exc:  # constriction reports invalid data as a generic error
            raise CorruptError(f"corrupt container: range decoder failed ({exc})") from None


# --- int24 (format version 4) ---------------------------------------------------------------


class WeightRows(NamedTuple):
    """Rows already quantised to their int24 weights ``w_i`` (uint32, rows x n) with their
    totals ``S`` (uint64 per row): what the model-only predictor hands the int24 coder
    (``nacrith._kernels.exp2_weight_rows``), the same integers as :func:`quantise` of its
    float64 rows, in half the memory."""

    weights: np.ndarray
    totals: np.ndarray

    def __len__(self) -> int:
        return len(self.totals)


class CodedRows:
    """A step's rows that the int24 coder does not read itself: it hands them its state and
    they code their symbols (a predictor that mixes, codes and learns each row while it is
    in the CPU's cache; see :class:`nacrith.predictors.ensemble.FusedStep`)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def int24_encode(self, symbols: np.ndarray, state: np.ndarray, out: np.ndarray) -> int:
        """Code one int32 symbol per row, in row order, from the encoder's ``state``
        (updated) into ``out``; returns the words written."""
        raise NotImplementedError

    def int24_decode(self, state: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
        """Decode one symbol per row into ``out`` (int32) from the decoder's ``state``
        (updated) and the coded ``words``; returns the symbols decoded (fewer: invalid data)."""
        raise NotImplementedError


def _prefix_and_scale(weights: np.ndarray, total: int) -> tuple[np.ndarray, float]:
    """(exact prefix sums ``C_0..C_n`` as int64, ``scale``) of a row's weights and their total."""
    n = len(weights)
    if not 2 <= n < TOTAL - 1 or total == 0:
        raise ValueError("probabilities are not a valid distribution")
    prefix = np.zeros(n + 1, np.int64)
    np.cumsum(weights, out=prefix[1:])
    return prefix, float(TOTAL - n) / float(total)


def quantise(row: np.ndarray) -> tuple[np.ndarray, float]:
    """(exact prefix sums ``C_0..C_n`` as int64, ``scale``) of one probability row (numpy reference)."""
    row = np.asarray(row, np.float64)
    if not np.isfinite(row).all() or row.min(initial=0.0) < 0 or not row.max(initial=0.0) > 0:
        raise ValueError("probabilities are not a valid distribution")
    exponent = 31 - math.frexp(float(row.max()))[1]
    first = min(exponent, MAX_STEP)
    weights = ((row * math.ldexp(1.0, first)) * math.ldexp(1.0, exponent - first)).astype(np.int64)
    return _prefix_and_scale(weights, int(weights.sum()))


def _quantised(rows) -> list[tuple[np.ndarray, float]]:
    """(prefix sums, scale) of each row, float64 rows or :class:`WeightRows` (numpy reference)."""
    if isinstance(rows, WeightRows):
        return [_prefix_and_scale(weights, total) for weights, total in zip(rows.weights, rows.totals.tolist())]
    return [quantise(row) for row in rows]


def _carry_words(first: int, pending: int, carried: bool) -> list[int]:
    """The pending ("inverted") words once their carry is known: the first word, plus the
    carry, then ``pending - 1`` words of all ones (no carry) or zeros (carry)."""
    return [(first + carried) & _WORD_MASK] + [0 if carried else _WORD_MASK] * (pending - 1)


def _interval(prefix: np.ndarray, scale: float, symbol: int) -> tuple[int, int]:
    n = len(prefix) - 1
    if not 0 <= symbol < n:
        raise ValueError("symbol out of range")
    left = int(float(prefix[symbol]) * scale) + symbol
    right = TOTAL if symbol == n - 1 else int(float(prefix[symbol + 1]) * scale) + symbol + 1
    return left, right


def _lefts(prefix: np.ndarray, scale: float) -> np.ndarray:
    """left(0..n) of a quantised row (left(n) = 2^24)."""
    n = len(prefix) - 1
    lefts = (prefix.astype(np.float64) * scale).astype(np.int64) + np.arange(n + 1)
    lefts[n] = TOTAL
    return lefts


def interval(row: np.ndarray, symbol: int) -> tuple[int, int]:
    """(left, right) of ``symbol`` in the int24 quantisation of ``row``."""
    return _interval(*quantise(row), symbol)


def _kernel_rows(rows) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(rows buffer, totals or None, columns) as the C kernel takes them."""
    if isinstance(rows, WeightRows):
        weights = np.ascontiguousarray(rows.weights, np.uint32)
        return weights, np.ascontiguousarray(rows.totals, np.uint64), weights.shape[1]
    rows = np.ascontiguousarray(rows, np.float64)
    return rows, None, rows.shape[1]


def encode_intervals_into(lefts: np.ndarray, rights: np.ndarray, state: np.ndarray, out: np.ndarray, use_kernel: bool | None = None) -> int:
    """Code the intervals ``[lefts[i], rights[i])`` of 2^24 (int64) in order from an int24
    encoder's ``state`` (uint64[4], updated) into ``out`` (uint32, room for
    ``len(lefts) + state[2]`` words); returns the words written. What a
    :class:`CodedRows` whose intervals are computed elsewhere (a GPU) calls."""
    use_kernel = _kernels is not None if use_kernel is None else use_kernel
    if use_kernel:
        return _kernels.int24_encode_intervals(lefts, rights, state, out)
    if (lefts < 0).any() or (rights <= lefts).any() or (rights > TOTAL).any():
        raise ValueError("an interval is empty or outside [0, 2^24)")
    words = _encode_numpy(state, zip(lefts.tolist(), rights.tolist()))
    out[: len(words)] = words
    return len(words)


def _encode_numpy(state: np.ndarray, intervals) -> np.ndarray:
    """The numpy reference encoder: code each (left, right) of ``intervals`` in turn from the
    encoder's ``state`` (updated); the words written, as uint32."""
    lower, range_, inverted, first = (int(v) for v in state)
    words: list[int] = []
    for left, right in intervals:
        unit = range_ >> PRECISION
        range_ = unit * (right - left)
        new_lower = (lower + unit * left) & _MASK64
        if inverted and (new_lower + range_) & _MASK64 > new_lower:  # the carry is settled
            words += _carry_words(first, inverted, new_lower < lower)
            inverted = 0
        lower = new_lower
        if range_ < _LOW_LIMIT:
            range_ <<= 32
            word, lower = lower >> 32, (lower << 32) & _MASK64
            if inverted:
                inverted += 1
            elif (lower + range_) & _MASK64 > lower:
                words.append(word)
            else:
                inverted, first = 1, word
    state[:] = (lower, range_, inverted, first)
    return np.asarray(words, np.uint32)


def decode_rows_into(rows, state: np.ndarray, words: np.ndarray, out: np.ndarray, use_kernel: bool | None = None) -> int:
    """Decode one symbol per row of ``rows`` (float64 rows or :class:`WeightRows`) into
    ``out`` (int32) from an int24 decoder's ``state`` (uint64[4], updated) and its coded
    ``words``; returns the symbols decoded (fewer than the rows: invalid data). The C
    kernel where it is built, else the numpy reference."""
    use_kernel = _kernels is not None if use_kernel is None else use_kernel
    if use_kernel:
        rows, totals, cols = _kernel_rows(rows)
        return _kernels.int24_decode(rows, totals, state, words, out, cols)
    return _decode_numpy(rows, state, words, out)


def _decode_numpy(rows, state: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
    """The numpy reference decoder (:func:`decode_rows_into`)."""
    lower, range_, point, next_word = (int(v) for v in state)
    for i, (prefix, scale) in enumerate(_quantised(rows)):
        lefts = _lefts(prefix, scale)
        unit = range_ >> PRECISION
        quantile = ((point - lower) & _MASK64) // unit
        if quantile >= TOTAL:
            return i
        symbol = int(np.searchsorted(lefts, quantile, side="right")) - 1
        left, right = int(lefts[symbol]), int(lefts[symbol + 1])
        lower = (lower + unit * left) & _MASK64
        range_ = unit * (right - left)
        if range_ < _LOW_LIMIT:
            lower, range_, point = (lower << 32) & _MASK64, range_ << 32, (point << 32) & _MASK64
            if next_word < len(words):
                point |= int(words[next_word])
                next_word += 1
        out[i] = symbol
        state[:] = (lower, range_, point, next_word)
    return len(out)


class Int24Encoder:
    """nacrith's range encoder; the C kernel where it is built, else the numpy reference."""

    def __init__(self, use_kernel: bool | None = None):
        self.use_kernel = _kernels is not None if use_kernel is None else use_kernel
        # lower, range, pending carry words ("inverted"), first pending word
        self._state = np.array([0, _MASK64, 0, 0], np.uint64)
        self._words: list[np.ndarray] = []

    def encode(self, symbols: np.ndarray, probabilities) -> None:
        """Append ``symbols[i]`` coded with the distribution ``probabilities[i]``: float64
        rows, :class:`WeightRows` or :class:`CodedRows`."""
        symbols = np.ascontiguousarray(symbols, np.int32)
        if len(symbols) != len(probabilities):
            raise ValueError("one symbol per row of probabilities")
        if not len(symbols):
            return
        if isinstance(probabilities, CodedRows):
            out = np.empty(len(symbols) + int(self._state[2]), np.uint32)
            self._words.append(out[:probabilities.int24_encode(symbols, self._state, out)])
            return
        if self.use_kernel:
            rows, totals, cols = _kernel_rows(probabilities)
            out = np.empty(len(symbols) + int(self._state[2]), np.uint32)
            written = _kernels.int24_encode(rows, totals, symbols, self._state, out, cols)
            self._words.append(out[:written])
            return
        intervals = (_interval(prefix, scale, symbol) for symbol, (prefix, scale) in zip(symbols.tolist(), _quantised(probabilities)))
        self._words.append(_encode_numpy(self._state, intervals))

    def encode_intervals(self, lefts: np.ndarray, rights: np.ndarray) -> None:
        """Append symbols already quantised to their intervals ``[lefts[i], rights[i])`` of
        2^24 (what :func:`interval` gives; computed elsewhere, e.g. on a GPU by
        :mod:`nacrith.exact.device_rows`): the same words as :meth:`encode` of their rows."""
        lefts, rights = np.ascontiguousarray(lefts, np.int64), np.ascontiguousarray(rights, np.int64)
        if lefts.shape != rights.shape or lefts.ndim != 1:
            raise ValueError("one right end per left end")
        out = np.empty(len(lefts) + int(self._state[2]), np.uint32)
        self._words.append(out[:encode_intervals_into(lefts, rights, self._state, out, self.use_kernel)])

    def finish(self) -> bytes:
        """The compressed bytes (little-endian 32-bit words), sealed as constriction seals them."""
        lower, range_, inverted, first = (int(v) for v in self._state)
        tail: list[int] = []
        if range_ != _MASK64:  # something was coded (an empty input gives no words)
            point = (lower + _WORD_MASK) & _MASK64
            if inverted:
                tail += _carry_words(first, inverted, point < lower)
            tail.append(point >> 32)
            if ((lower + range_) & _MASK64) >> 32 == point >> 32:
                tail.append(0)
        return np.concatenate(self._words + [np.asarray(tail, np.uint32)]).astype("<u4").tobytes()


class Int24Decoder:
    """Reads back what :class:`Int24Encoder` wrote, given the same probability rows."""

    def __init__(self, data: bytes, use_kernel: bool | None = None):
        self.use_kernel = _kernels is not None if use_kernel is None else use_kernel
        self._words = np.frombuffer(data, "<u4").astype(np.uint32)
        point = 0
        for word in self._words[:2].tolist():
            point = (point << 32) | word
        if len(self._words) == 1:
            point <<= 32
        # lower, range, point, next word
        self._state = np.array([0, _MASK64, point, min(2, len(self._words))], np.uint64)

    def decode(self, probabilities) -> np.ndarray:
        """One symbol per row of ``probabilities`` (float64 rows, :class:`WeightRows` or
        :class:`CodedRows`), as int32."""
        symbols = np.empty(len(probabilities), np.int32)
        if not len(symbols):
            return symbols
        if isinstance(probabilities, CodedRows):
            decoded = probabilities.int24_decode(self._state, self._words, symbols)
        else:
            decoded = decode_rows_into(probabilities, self._state, self._words, symbols, self.use_kernel)
        if decoded < len(symbols):
            raise CorruptError("corrupt container: range decoder found invalid data")
        return symbols
