"""Compression without the model: binary segments and whole blocks as stored, zstd -19 or
xz -9e (raw LZMA2), whichever is smallest."""
from __future__ import annotations

import lzma

import zstandard

from . import container as fmt
from .errors import CorruptError

ZSTD_LEVEL = 19
XZ_WORTH_TRYING = 0.97  # try xz only where zstd saved at least 3%: on noise it only costs time
# zstd -19 runs at ~2 MB/s even on noise; a level-1 probe (hundreds of MB/s) that saves under
# 1% marks data (compressed media, archives, ciphertext) as not worth the slow codecs
PROBE_LEVEL = 1
PROBE_WORTH_TRYING = 0.99
PLAIN_KINDS = {fmt.BINARY_STORED: fmt.STORED, fmt.BINARY_ZSTD: fmt.ZSTD, fmt.BINARY_XZ: fmt.XZ}  # whole-block kinds
BINARY_CODEC_OF_KIND = {kind: codec for codec, kind in PLAIN_KINDS.items()}


def zstd_compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False).compress(data)


def xz_compress(data: bytes) -> bytes:
    """A raw LZMA2 stream of ``data`` (the container's xz codec)."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=fmt.XZ_FILTERS)


def xz_decompress(stream, expected: int) -> bytes:
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=fmt.XZ_FILTERS)
    try:
        data = decompressor.decompress(bytes(stream), max_length=expected + 1)
    except lzma.LZMAError as exc:
        raise CorruptError(f"corrupt container: xz data does not decode ({exc})") from None
    if len(data) != expected:
        raise CorruptError("corrupt container: xz data has the wrong length")
    return data


def pack_binary(data: bytes) -> tuple[int, bytes]:
    """The smallest of stored, zstd and xz for ``data``: (binary codec, payload).

    Data that a fast zstd probe cannot shrink by 1% is stored without trying the slow
    levels, and xz is only tried where zstd found something to squeeze (both are slow on
    noise).
    """
    best = (fmt.BINARY_STORED, data)
    probe = zstandard.ZstdCompressor(level=PROBE_LEVEL).compress(data)
    if len(probe) >= PROBE_WORTH_TRYING * len(data):
        return best
    packed = zstd_compress(data)
    if len(packed) < len(data):
        best = (fmt.BINARY_ZSTD, packed)
        if len(packed) < XZ_WORTH_TRYING * len(data):
            packed = xz_compress(data)
            if len(packed) < len(best[1]):
                best = (fmt.BINARY_XZ, packed)
    return best


def unpack_binary(codec: int, payload, expected: int) -> bytes:
    """The inverse of :func:`pack_binary`."""
    if codec == fmt.BINARY_ZSTD:
        return zstd_decompress(payload, expected)
    if codec == fmt.BINARY_XZ:
        return xz_decompress(payload, expected)
    return bytes(payload)


def zstd_decompress(frame, expected: int) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(expected, 1))
    except zstandard.ZstdError as exc:
        raise CorruptError(f"corrupt container: zstd data does not decode ({exc})") from None
    if len(data) != expected:
        raise CorruptError("corrupt container: zstd data has the wrong length")
    return data
