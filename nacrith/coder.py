"""The range coder: constriction's queue-order range coder at its default 24-bit precision.

One coder serves all the streams of a block: at every lockstep step the symbols of the
active streams are coded in stream order, each with its own row of probabilities. The
decoder knows every row of a step before it decodes any symbol of that step (a row depends
only on earlier symbols of its own stream), so it decodes the whole step in one call.

Probabilities are float64 rows (they need not be normalised: constriction normalises and
quantises them to 24-bit integers, giving every symbol a nonzero probability), so every
token stays codable whatever the model believes.
"""
from __future__ import annotations

import constriction
import numpy as np

from .errors import CorruptError

_FAMILY = constriction.stream.model.Categorical(perfect=False)


class RangeEncoder:
    """Collects symbols, one row of probabilities each, into a compressed byte string."""

    def __init__(self):
        self._encoder = constriction.stream.queue.RangeEncoder()

    def encode(self, symbols: np.ndarray, probabilities: np.ndarray) -> None:
        """Append ``symbols[i]`` coded with the distribution ``probabilities[i]`` (float64)."""
        self._encoder.encode(np.ascontiguousarray(symbols, np.int32), _FAMILY, probabilities)

    def finish(self) -> bytes:
        """The compressed bytes (little-endian 32-bit words)."""
        return self._encoder.get_compressed().astype("<u4").tobytes()


class RangeDecoder:
    """Reads back what :class:`RangeEncoder` wrote, given the same probability rows."""

    def __init__(self, data: bytes):
        if len(data) % 4:
            raise CorruptError("corrupt container: coded stream length is not a multiple of 4")
        self._decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))

    def decode(self, probabilities: np.ndarray) -> np.ndarray:
        """One symbol per row of ``probabilities``, as int32."""
        try:
            return np.asarray(self._decoder.decode(_FAMILY, probabilities), np.int32)
        except Exception as exc:  # constriction reports invalid data as a generic error
            raise CorruptError(f"corrupt container: range decoder failed ({exc})") from None
