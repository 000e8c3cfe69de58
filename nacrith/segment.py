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

import re

import numpy as np

MIN_TEXT = 64  # shorter text regions are left to zstd with the surrounding binary
MAX_GAP = 8  # longest run of non-texty bytes merged into a text region
MAX_STRAY_FRACTION = 0.2  # a region with more stray bytes than this is not text

_TEXT_RUN = re.compile(
    rb"(?:[\t\n\r\x20-\x7e]"
    rb"|[\xc2-\xdf][\x80-\xbf]"
    rb"|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


def texty_mask(data: bytes, has_byte_token: np.ndarray) -> np.ndarray:
    """Boolean per byte: part of a texty run, and spellable as a byte token."""
    mask = np.zeros(len(data), bool)
    for match in _TEXT_RUN.finditer(data):
        mask[match.start():match.end()] = True
    if len(data):
        mask &= has_byte_token[np.frombuffer(data, np.uint8)]
    return mask


def _runs(mask: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in ``mask`` as (value, start, end)."""
    if len(mask) == 0:
        return []
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(mask)]))
    return [(bool(mask[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def split_segments(
    data: bytes,
    has_byte_token: np.ndarray,
    min_text: int = MIN_TEXT,
    max_gap: int = MAX_GAP,
    max_stray_fraction: float = MAX_STRAY_FRACTION,
) -> list[tuple[bool, int]]:
    """Segments ``(is_text, length)`` covering ``data`` (see the module docstring)."""
    if not data:
        return []
    codes = np.frombuffer(data, np.uint8)
    texty = texty_mask(data, has_byte_token)
    spellable = has_byte_token[codes]
    text = np.zeros(len(data), bool)
    region_start = None  # start of the text region being grown
    strays = 0
    region_end = 0
    for is_texty, start, end in _runs(texty):
        if is_texty:
            if region_start is None:
                region_start, strays = start, 0
            region_end = end
            continue
        short_gap = end - start <= max_gap
        if short_gap and start == 0:  # stray bytes opening the data join the text after them
            region_start, strays, region_end = 0, end, end
            continue
        if short_gap and region_start is not None:
            strays += end - start
            region_end = end if end == len(data) else region_end  # stray bytes closing the data
            continue
        if region_start is not None:
            _accept(text, region_start, region_end, strays, min_text, max_stray_fraction)
            region_start = None
    if region_start is not None:
        _accept(text, region_start, region_end, strays, min_text, max_stray_fraction)
    text &= spellable
    return [(kind, end - start) for kind, start, end in _runs(text)]


def _accept(text: np.ndarray, start: int, end: int, strays: int, min_text: int, max_stray_fraction: float) -> None:
    length = end - start
    if length >= min_text and strays <= max_stray_fraction * length:
        text[start:end] = True
