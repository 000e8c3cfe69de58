"""Cutting a block of bytes into text segments (for the model) and binary segments (for zstd).

A byte is *texty* when it belongs to a printable ASCII character, a tab/CR/LF, or a
well-formed UTF-8 multi-byte character, and has a single-byte token. Maximal texty runs
are merged across short gaps of other bytes (stray Latin-1 letters, a few control or
binary bytes). A merged region is text when it is long enough and its stray bytes are
few; everything else is binary. Inside a text region, stray bytes with a single-byte token
stay in the text (the model spells them); those without one are cut out as one-byte
binary segments, so the text around them is still coded by the model as one sequence.

The result is a list of ``(is_text, length)`` pairs that covers the block exactly; adjacent
segments always differ in kind.
"""
from __future__ import annotations

import numpy as np

MIN_TEXT = 64  # shorter text regions are left to zstd with the surrounding binary
MAX_GAP = 8  # longest run of non-texty bytes merged into a text region
MAX_STRAY_FRACTION = 0.2  # a region with more stray bytes than this is not text

_ASCII_TEXT = np.zeros(256, bool)
_ASCII_TEXT[[0x09, 0x0A, 0x0D]] = True
_ASCII_TEXT[0x20:0x7F] = True


def _in(codes: np.ndarray, low: int, high: int) -> np.ndarray:
    return (codes >= low) & (codes <= high)


def texty_mask(data: bytes, has_byte_token: np.ndarray) -> np.ndarray:
    """Boolean per byte: a printable ASCII character, a tab/CR/LF, or a byte of a
    well-formed UTF-8 character, and spellable as a byte token.

    Array operations over the whole block (a regular expression scanned random data at
    ~4 MB/s): a UTF-8 lead byte never continues another character, so the well-formed
    characters are exactly those whose lead byte is followed by valid continuation bytes.
    """
    codes = np.frombuffer(data, np.uint8)
    n = len(codes)
    mask = _ASCII_TEXT[codes]
    padded = np.concatenate((codes, np.zeros(3, np.uint8)))  # 0 is no continuation byte
    c1, c2, c3 = padded[1:n + 1], padded[2:n + 2], padded[3:n + 3]
    cont1, cont2, cont3 = _in(c1, 0x80, 0xBF), _in(c2, 0x80, 0xBF), _in(c3, 0x80, 0xBF)
    two = _in(codes, 0xC2, 0xDF) & cont1
    three = ((codes == 0xE0) & _in(c1, 0xA0, 0xBF) | (_in(codes, 0xE1, 0xEC) | (codes == 0xEE) | (codes == 0xEF)) & cont1
             | (codes == 0xED) & _in(c1, 0x80, 0x9F)) & cont2
    four = ((codes == 0xF0) & _in(c1, 0x90, 0xBF) | _in(codes, 0xF1, 0xF3) & cont1 | (codes == 0xF4) & _in(c1, 0x80, 0x8F)) & cont2 & cont3
    for lead, length in ((two, 2), (three, 3), (four, 4)):
        starts = np.flatnonzero(lead)
        for offset in range(length):
            mask[starts + offset] = True
    return mask & has_byte_token[codes]


def _runs(mask: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in ``mask`` as (value, start, end)."""
    values, starts, ends = _run_arrays(mask)
    return [(bool(v), int(s), int(e)) for v, s, e in zip(values, starts, ends)]


def _run_arrays(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal values in ``mask``: (values, starts, ends) arrays."""
    if len(mask) == 0:
        empty = np.empty(0, np.int64)
        return np.empty(0, bool), empty, empty
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(mask)]))
    return mask[starts], starts, ends


def split_segments(
    data: bytes,
    has_byte_token: np.ndarray,
    min_text: int = MIN_TEXT,
    max_gap: int = MAX_GAP,
    max_stray_fraction: float = MAX_STRAY_FRACTION,
) -> list[tuple[bool, int]]:
    """Segments ``(is_text, length)`` covering ``data`` (see the module docstring).

    A region is a maximal chain of texty runs joined by gaps of at most ``max_gap`` other
    bytes; a short gap that opens or closes the data belongs to the region beside it. Its
    stray bytes are the other bytes inside it. All of it as array operations over the runs.
    """
    if not data:
        return []
    n = len(data)
    texty = texty_mask(data, has_byte_token)
    values, starts, ends = _run_arrays(texty)
    lengths = ends - starts
    breaks = ~values & (lengths > max_gap)  # gaps that end a region
    region_of = np.cumsum(breaks)  # runs with one number lie in one region (or between two)
    text = np.zeros(n, bool)
    if values.any():
        # a region spans from its first texty run to its last, or from a short gap that opens
        # the data (at 0) and to one that closes it (at n); runs alternate, so such a gap is
        # next to a texty run of its region, and every region holds one
        member = values.copy()
        member[0] |= not breaks[0]
        member[-1] |= not breaks[-1]
        ids = region_of[member]
        first = _group_starts(ids)
        region_start = np.minimum.reduceat(starts[member], first)
        region_end = np.maximum.reduceat(ends[member], first)
        texty_bytes = np.add.reduceat(np.where(values[member], lengths[member], 0), first)
        length = region_end - region_start
        strays = length - texty_bytes
        accepted = (length >= min_text) & (strays <= max_stray_fraction * length)
        for start, end in zip(region_start[accepted].tolist(), region_end[accepted].tolist()):
            text[start:end] = True
    text &= has_byte_token[np.frombuffer(data, np.uint8)]
    return [(kind, end - start) for kind, start, end in _runs(text)]


def _group_starts(ids: np.ndarray) -> np.ndarray:
    """Where each run of equal ids begins in ``ids``."""
    return np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
