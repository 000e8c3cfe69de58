"""A long-range match model (LZP style) over token histories.

The last ``min_length`` tokens are hashed to the place that followed their previous
occurrence (in this stream, or in any stream of the block when the index is shared). While
the stream keeps repeating what followed there, the match grows and the model predicts the
next token of the earlier copy; a wrong prediction ends the match and a new one is looked
up.
"""
from __future__ import annotations


class MatchIndex:
    """Where each ``min_length``-token context last occurred: (history, position after it)."""

    def __init__(self, min_length: int = 6):
        self.min_length = min_length
        self.last_seen: dict[tuple, tuple[list, int]] = {}


class MatchState:
    """One stream's current match against a :class:`MatchIndex`."""

    def __init__(self, index: MatchIndex, history: list[int]):
        self.index = index
        self.history = history  # the stream's own tokens (shared with its other models)
        self.source: list[int] | None = None  # the history holding the earlier copy
        self.position = -1
        self.length = 0

    def predicted(self) -> int:
        """The predicted next token, or -1 without a match."""
        if self.source is None or self.position >= len(self.source):
            return -1
        return self.source[self.position]

    def update(self, token: int) -> None:
        """Follow ``token``, which has just been appended to the stream's history."""
        if self.predicted() == token:
            self.position += 1
            self.length += 1
        else:
            self.source, self.position, self.length = None, -1, 0
        history, size = self.history, self.index.min_length
        if len(history) < size:
            return
        key = tuple(history[-size:])
        if self.source is None:
            earlier = self.index.last_seen.get(key)
            if earlier is not None:
                self.source, self.position = earlier
        self.index.last_seen[key] = (history, len(history))
