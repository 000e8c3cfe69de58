"""Token n-gram statistics learned online.

For each order ``k`` (1 to ``max_order``) the tables map the last ``k`` tokens of a
history to the tokens seen after them, with counts. Each context keeps at most
``max_per_context`` followers (the least frequent is dropped to admit a new one), so memory
per context is bounded. One :class:`NGramTables` may serve one stream or all the streams of
a block (they are parallel cursors through the same document); the mixer turns the counts
into log-space evidence (see :mod:`nacrith.predictors.ensemble`).
"""
from __future__ import annotations


class NGramTables:
    """Follower counts of contexts of 1..max_order tokens."""

    def __init__(self, max_order: int = 4, max_per_context: int = 16):
        self.max_order = max_order
        self.max_per_context = max_per_context
        self.tables: list[dict] = [dict() for _ in range(max_order + 1)]  # index = order; 0 unused

    def contexts(self, history: list[int]) -> list[dict | None]:
        """For orders 1..max_order, the follower counts after ``history`` (None if unseen)."""
        found = []
        for order in range(1, self.max_order + 1):
            if len(history) < order:
                found.append(None)
                continue
            found.append(self.tables[order].get(tuple(history[-order:])))
        return found

    def update(self, history: list[int], token: int) -> None:
        """Count ``token`` after every context ending ``history`` (before it is appended)."""
        for order in range(1, min(self.max_order, len(history)) + 1):
            key = tuple(history[-order:])
            followers = self.tables[order].get(key)
            if followers is None:
                self.tables[order][key] = {token: 1}
            elif token in followers:
                followers[token] += 1
            else:
                if len(followers) >= self.max_per_context:
                    del followers[min(followers, key=followers.__getitem__)]
                followers[token] = 1
