"""One block, coded and decoded: the unit that a worker, a lane or a Ray actor runs.

:func:`compress_block` turns ``block_size`` bytes of input into a container block: its text
segments (:mod:`nacrith.segment`) are tokenized exactly, joined, cut into lockstep streams
and range-coded with the predictor's distributions (:mod:`nacrith.lockstep`); its binary
segments are joined and compressed with zstd -19 or xz -9e, or stored, whichever is smallest
(:mod:`nacrith.binary`); the block is then written as whichever of "model", "zstd", "xz" or
"stored" is smallest. :func:`decode_block` is its inverse. Both take a session factory, so
that a block without text never loads a model. docs/format.md section 5 is the normative
description of a model block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import container as fmt
from .binary import BINARY_CODEC_OF_KIND, PLAIN_KINDS, pack_binary, unpack_binary
from .errors import CorruptError
from .lockstep import Lockstep, split_streams
from .predictors import make_predictor
from .segment import split_segments
from .settings import Progress, Settings


@dataclass(frozen=True)
class EncodedBlock:
    """A block ready for the container; ``alternative`` is its best encoding without the model."""

    data: bytes
    raw_length: int
    uses_model: bool
    alternative: bytes | None


def compress_block(data: bytes, settings: Settings, session_factory: Callable, progress: Progress | None = None) -> EncodedBlock:
    """The smallest encoding of ``data`` as a block, and the best one without the model.

    ``session_factory()`` returns the :class:`~nacrith.session.Session` to use; it is only
    called when the block has text for the model.
    """
    if settings.fallback or not settings.use_model:
        codec, payload = pack_binary(data)
        plain = fmt.Block(PLAIN_KINDS[codec], len(data), payload)
    else:
        plain = fmt.Block(fmt.STORED, len(data), data)
    model_block = _model_block(data, settings, session_factory, progress) if settings.use_model and data else None
    if model_block is not None and (len(model_block.payload) < len(plain.payload) or not settings.fallback):
        alternative = fmt.write_block(plain) if settings.fallback else None
        return EncodedBlock(fmt.write_block(model_block), len(data), True, alternative)
    if progress and model_block is None:
        progress(len(data))
    return EncodedBlock(fmt.write_block(plain), len(data), False, None)


def _model_block(data: bytes, settings: Settings, session_factory: Callable, progress: Progress | None) -> fmt.Block | None:
    session = session_factory()
    segments = split_segments(data, session.tokenizer.has_byte_token)
    if not any(is_text for is_text, _ in segments):
        return None
    text_parts, binary_parts, offset = [], [], 0
    for is_text, length in segments:
        (text_parts if is_text else binary_parts).append(data[offset:offset + length])
        offset += length
    tokens = np.asarray([token for part in text_parts for token in session.tokenizer.encode(part)], np.int32)
    binary = b"".join(binary_parts)
    binary_codec, binary_payload = pack_binary(binary)
    streams = lockstep_streams(tokens, settings)
    lengths = [len(stream) for stream in streams]
    lockstep = _lockstep(session, len(lengths), settings.ctx, settings.slide, settings.attention_mode, settings.predictor, progress, len(data) / max(1, len(tokens)), settings.coder)
    coded = lockstep.encode(streams)
    return fmt.Block(
        kind=fmt.MODEL,
        raw_length=len(data),
        payload=binary_payload + coded,
        segments=tuple(segments),
        binary_codec=binary_codec,
        binary_length=len(binary_payload),
        stream_tokens=tuple(lengths),
        coded_length=len(coded),
    )


def text_tokens(data: bytes, tokenizer) -> np.ndarray:
    """The tokens of ``data``'s text segments, in order (what a model block codes)."""
    tokens, offset = [], 0
    for is_text, length in split_segments(data, tokenizer.has_byte_token):
        if is_text:
            tokens += tokenizer.encode(data[offset:offset + length])
        offset += length
    return np.asarray(tokens, np.int32)


def lockstep_streams(tokens: np.ndarray, settings: Settings) -> list[np.ndarray]:
    """A block's tokens cut into its contiguous lockstep streams.

    At most ``settings.streams`` of them, fewer when that would leave a stream shorter than
    ``settings.min_stream_tokens``; the lengths are those of :func:`split_streams`.
    """
    n_streams = max(1, min(settings.streams, len(tokens) // settings.min_stream_tokens))
    lengths = split_streams(len(tokens), n_streams)
    bounds = np.cumsum([0] + lengths)
    return [tokens[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def _lockstep(session, n_streams: int, ctx: int, slide: int, attention: str, predictor: dict, progress: Progress | None, bytes_per_token: float, coder: str) -> Lockstep:
    context = session.context(n_streams, ctx, attention)
    model = make_predictor(predictor, session.llama.n_vocab, n_streams, session.tokenizer.pieces, session.threads or 1)
    per_step = None
    if progress:
        per_step = lambda running: progress(running * bytes_per_token)  # noqa: E731
    return Lockstep(context, session.llama.bos, ctx, slide, model, per_step, coder)


def decode_block(block: fmt.Block, section: fmt.ModelSection | None, session_factory: Callable, progress: Progress | None = None) -> bytes:
    """The original bytes of one parsed block."""
    block = block.read_in()
    if block.kind == fmt.STORED:
        data = bytes(block.payload)
    elif block.kind in (fmt.ZSTD, fmt.XZ):
        data = unpack_binary(BINARY_CODEC_OF_KIND[block.kind], block.payload, block.raw_length)
    else:
        data = _decode_model_block(block, section, session_factory(), progress)
    if len(data) != block.raw_length:
        raise CorruptError("corrupt container: a block decoded to the wrong length")
    if block.kind != fmt.MODEL and progress:
        progress(len(data))
    return data


def _decode_model_block(block: fmt.Block, section: fmt.ModelSection, session, progress: Progress | None) -> bytes:
    binary_size = block.raw_length - block.text_length
    binary = unpack_binary(block.binary_codec, block.binary_payload, binary_size)
    if len(binary) != binary_size:
        raise CorruptError("corrupt container: binary segments have the wrong length")
    lengths = list(block.stream_tokens)
    try:
        lockstep = _lockstep(session, len(lengths), section.ctx, section.slide, section.attention, section.predictor, progress, block.raw_length / max(1, block.n_tokens), section.coder)
    except ValueError as exc:
        raise CorruptError(f"corrupt container: {exc}") from None
    streams = lockstep.decode(block.coded, lengths)
    text = session.tokenizer.decode(np.concatenate(streams).tolist()) if streams else b""
    if len(text) != block.text_length:
        raise CorruptError("corrupt container: decoded text has the wrong length (damaged data, or different logits)")
    out, text_at, binary_at = [], 0, 0
    for is_text, length in block.segments:
        if is_text:
            out.append(text[text_at:text_at + length])
            text_at += length
        else:
            out.append(binary[binary_at:binary_at + length])
            binary_at += length
    return b"".join(out)
