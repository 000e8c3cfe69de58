"""Token n-gram statistics learned online.

For each order ``k`` (1 to ``max_order``) the tables map the last ``k`` tokens of a
history to the tokens seen after them, with counts. Each context keeps at most
``max_per_context`` followers (the least frequent is dropped to admit a new one), so memory
per context is bounded. One :class:`NGramTables` may serve one stream or all the streams of
a block (they are parallel cursors through the same document); the mixer turns the counts
into log-space evidence (see :mod:`nacrith.predictors.ensemble`).

Most contexts are seen once (57% of the updates on bible.txt at 121 streams made a new
one), so a context with a single follower seen once holds that token (an int) instead of a
dict; it becomes a dict ``{token: count}`` when anything follows it again, with the same
insertion order as a dict from the start would have.
"""
from __future__ import annotations


class NGramTables:
    """Follower counts of contexts of 1..max_order tokens."""

    def __init__(self, max_order: int = 4, max_per_context: int = 16):
        self.max_order = max_order
        self.max_per_context = max_per_context
        self.tables: list[dict] = [dict() for _ in range(max_order + 1)]  # index = order; 0 unused

    def keys(self, history: list[int]) -> list[int]:
        """The context keys ending ``history``, for orders 1..max_order (as far as it reaches):
        the last ``order`` tokens as one int, 32 bits per token (token ids are below 2^32),
        the newest lowest; smaller than a tuple of them and as exact."""
        keys, key, shift = [], 0, 0
        for token in reversed(history[-self.max_order:]):
            key |= token << shift
            keys.append(key)
            shift += 32
        return keys

    def contexts(self, history: list[int], keys: list[int] | None = None) -> list[dict | int | None]:
        """For orders 1..max_order, the follower counts after ``history``: a dict, an int (the
        one token seen once after it) or None (unseen); ``keys``: :meth:`keys` of
        ``history``, when the caller already has them."""
        if keys is None:
            keys = self.keys(history)
        found = [self.tables[order].get(key) for order, key in enumerate(keys, start=1)]
        return found + [None] * (self.max_order - len(found))

    def update(self, history: list[int], token: int, keys: list[int] | None = None) -> None:
        """Count ``token`` after every context ending ``history`` (before it is appended);
        ``keys``: :meth:`keys` of ``history``, when the caller already has them. Tokens, here
        and in ``history``, are Python ints (a numpy integer would overflow the keys' shifts
        and not be told apart from a follower dict)."""
        if keys is None:
            keys = self.keys(history)
        for order, key in enumerate(keys, start=1):
            table = self.tables[order]
            followers = table.get(key)
            if followers is None:
                table[key] = token  # seen once, followed by token
            elif followers.__class__ is int:
                table[key] = {followers: 2} if followers == token else {followers: 1, token: 1}
            elif token in followers:
                followers[token] += 1
            else:
                if len(followers) >= self.max_per_context:
                    del followers[min(followers, key=followers.__getitem__)]
                followers[token] = 1
