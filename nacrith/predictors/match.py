"""A long-range match model (LZP style) over token histories.

The last ``min_length`` tokens are hashed to the place that followed their previous
occurrence (in this stream, or in any stream of the block when the index is shared). While
the stream keeps repeating what followed there, the match grows and the model predicts the
next token of the earlier copy; a wrong prediction ends the match and a new one is looked
up.

The index holds one entry per token of every stream, so its entries are kept small: the key
is the ``min_length`` tokens as one int (32 bits each, the oldest highest), which each
stream keeps rolling token by token, and the value is the stream's number and the position
in one int.
"""
from __future__ import annotations

POSITION_BITS = 40  # a value is stream << POSITION_BITS | position


class MatchIndex:
    """Where each ``min_length``-token context last occurred: its stream and the position
    after it, packed in one int (:data:`POSITION_BITS`)."""

    def __init__(self, min_length: int = 6):
        self.min_length = min_length
        self.last_seen: dict[int, int] = {}
        self.histories: list[list[int]] = []  # the streams' histories, by stream number

    def add_stream(self, history: list[int]) -> int:
        """Number a stream's history for the index's values."""
        self.histories.append(history)
        return len(self.histories) - 1


class MatchState:
    """One stream's current match against a :class:`MatchIndex`."""

    def __init__(self, index: MatchIndex, history: list[int]):
        self.index = index
        self.history = history  # the stream's own tokens (shared with its other models)
        self.stream = index.add_stream(history)
        self.key = 0  # the last min_length tokens of history (fewer at its start), 32 bits each
        self.key_mask = (1 << (32 * index.min_length)) - 1
        self.source: list[int] | None = None  # the history holding the earlier copy
        self.position = -1
        self.length = 0

    def predicted(self) -> int:
        """The predicted next token, or -1 without a match."""
        if self.source is None or self.position >= len(self.source):
            return -1
        return self.source[self.position]

    def update(self, token: int) -> None:
        """Follow ``token`` (a Python int: the key's shifts need one), which has just been
        appended to the stream's history."""
        if self.predicted() == token:
            self.position += 1
            self.length += 1
        else:
            self.source, self.position, self.length = None, -1, 0
        self.key = ((self.key << 32) | token) & self.key_mask
        history = self.history
        if len(history) < self.index.min_length:
            return
        if self.source is None:
            earlier = self.index.last_seen.get(self.key)
            if earlier is not None:
                self.source, self.position = self.index.histories[earlier >> POSITION_BITS], earlier & ((1 << POSITION_BITS) - 1)
        self.index.last_seen[self.key] = self.stream << POSITION_BITS | len(history)
