"""Compression and decompression of whole inputs, block by block.

The input is cut into blocks of ``block_size`` bytes, each coded on its own:

* its text segments (:mod:`nacrith.segment`) are tokenized exactly, joined, cut into
  lockstep streams and range-coded with the model's predictions (:mod:`nacrith.lockstep`);
* its binary segments are joined and compressed with zstd (or stored when that is smaller);
* the block is then stored as whichever of "model", "zstd" or "stored" is smallest, so no
  block, and no file of one block, ends up much larger than ``zstd -19`` would make it.

The container (:mod:`nacrith.container`) records everything decoding needs. Decoding checks
the structure, the model and the backend before any model work, and the checksum of the
result after.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Callable, Iterator

import numpy as np
import zstandard

from . import container as fmt
from .errors import BackendMismatchError, CorruptError, EngineError, ModelMismatchError, NacrithError
from .lockstep import Lockstep, check_window, split_streams
from .predictors.llm import LLMPredictor
from .segment import split_segments

ZSTD_LEVEL = 19

# Defaults, chosen from bench/tradeoff.py on the 2-core development machine (see README).
DEFAULT_STREAMS = 16
DEFAULT_CTX = 1024
DEFAULT_SLIDE = 256
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_STREAM_TOKENS = 512  # fewer tokens per stream than this and a block uses fewer streams
SPOOL_IN_MEMORY = 64 << 20

Progress = Callable[[float], None]


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a container. ``model`` None means $NACRITH_MODEL or the default."""

    model: str | None = None
    streams: int = DEFAULT_STREAMS
    ctx: int = DEFAULT_CTX
    slide: int = DEFAULT_SLIDE
    block_size: int = DEFAULT_BLOCK_SIZE
    min_stream_tokens: int = MIN_STREAM_TOKENS
    threads: int | None = None
    gpu: bool = False
    use_model: bool = True  # False: zstd/stored blocks only
    fallback: bool = True  # False: text blocks always use the model (for tests and measurements)

    def validate(self) -> "Settings":
        if self.streams < 1:
            raise ValueError("streams must be at least 1")
        if self.block_size < 1:
            raise ValueError("block size must be at least 1 byte")
        if self.min_stream_tokens < 1:
            raise ValueError("min_stream_tokens must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        check_window(self.ctx, self.slide)
        return self


def zstd_compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False).compress(data)


def zstd_decompress(frame: bytes, expected: int) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(expected, 1))
    except zstandard.ZstdError as exc:
        raise CorruptError(f"corrupt container: zstd data does not decode ({exc})") from None
    if len(data) != expected:
        raise CorruptError("corrupt container: zstd data has the wrong length")
    return data


# --- compression --------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedBlock:
    """A block ready for the container; ``alternative`` is its best encoding without the model."""

    data: bytes
    raw_length: int
    uses_model: bool
    alternative: bytes | None


class Compressor:
    """Compresses blocks with one :class:`~nacrith.session.Session` (created on first use)."""

    def __init__(self, settings: Settings, progress: Progress | None = None, session=None):
        self.settings = settings.validate()
        self.progress = progress
        self._session = session

    @property
    def session(self):
        if self._session is None:
            from .session import Session  # loads llama.cpp only when a block needs it

            self._session = Session(self.settings.model, gpu=self.settings.gpu, threads=self.settings.threads)
        return self._session

    def model_section(self) -> fmt.ModelSection:
        from .session import engine_name

        session = self.session
        return fmt.ModelSection(
            sha256=session.info.sha256,
            name=session.info.name,
            engine=engine_name(),
            backend=session.backend,
            ctx=self.settings.ctx,
            slide=self.settings.slide,
            predictor=dict(LLMPredictor.settings),
        )

    def compress_block(self, data: bytes) -> EncodedBlock:
        """The smallest encoding of ``data`` as a block, and the best one without the model."""
        plain = min(
            [fmt.Block(fmt.STORED, len(data), data)]
            + ([fmt.Block(fmt.ZSTD, len(data), zstd_compress(data))] if self.settings.fallback or not self.settings.use_model else []),
            key=lambda block: len(block.payload),
        )
        model_block = self._model_block(data) if self.settings.use_model and data else None
        if model_block is not None and (len(model_block.payload) < len(plain.payload) or not self.settings.fallback):
            alternative = fmt.write_block(plain) if self.settings.fallback else None
            return EncodedBlock(fmt.write_block(model_block), len(data), True, alternative)
        if self.progress:
            self.progress(len(data))
        return EncodedBlock(fmt.write_block(plain), len(data), False, None)

    def _model_block(self, data: bytes) -> fmt.Block | None:
        session = self.session
        segments = split_segments(data, session.tokenizer.has_byte_token)
        if not any(is_text for is_text, _ in segments):
            return None
        text_parts, binary_parts, offset = [], [], 0
        for is_text, length in segments:
            (text_parts if is_text else binary_parts).append(data[offset:offset + length])
            offset += length
        tokens: list[int] = []
        for part in text_parts:
            tokens.extend(session.tokenizer.encode(part))
        binary = b"".join(binary_parts)
        binary_codec, binary_payload = fmt.BINARY_STORED, binary
        if binary:
            packed = zstd_compress(binary)
            if len(packed) < len(binary):
                binary_codec, binary_payload = fmt.BINARY_ZSTD, packed
        n_streams = max(1, min(self.settings.streams, len(tokens) // self.settings.min_stream_tokens))
        lengths = split_streams(len(tokens), n_streams)
        token_array = np.asarray(tokens, np.int32)
        streams, start = [], 0
        for length in lengths:
            streams.append(token_array[start:start + length])
            start += length
        coded = self._lockstep(len(lengths), len(data) / max(1, len(tokens))).encode(streams)
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

    def _lockstep(self, n_streams: int, bytes_per_token: float) -> Lockstep:
        session = self.session
        context = session.context(n_streams, self.settings.ctx)
        predictor = LLMPredictor(session.llama.n_vocab, n_streams)
        progress = None
        if self.progress:
            progress = lambda running: self.progress(running * bytes_per_token)  # noqa: E731
        return Lockstep(context, session.llama.bos, self.settings.ctx, self.settings.slide, predictor, progress)


def read_blocks(source: BinaryIO, block_size: int) -> Iterator[bytes]:
    """The input, ``block_size`` bytes at a time (the last block may be shorter)."""
    while True:
        block = source.read(block_size)
        if not block:
            return
        while len(block) < block_size:  # pipes return short reads
            more = source.read(block_size - len(block))
            if not more:
                break
            block += more
        yield block


@dataclass(frozen=True)
class Summary:
    """What a compression produced."""

    original_size: int
    compressed_size: int
    blocks: int
    model_used: bool


class ContainerWriter:
    """Collects encoded blocks in order and writes the finished container.

    Blocks are spooled (in memory up to 64 MiB, then on disk) because the header, written
    first, says whether any block used the model. While the model has saved fewer bytes
    than its header section costs, the model-free alternatives of model blocks are kept, so
    a file the model barely helps is written without the model section, no larger than
    zstd would make it plus a few dozen bytes of framing.
    """

    KEEP_ALTERNATIVES_UNTIL = 1024  # bytes saved by the model: far more than its header section

    def __init__(self):
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        self.digest = hashlib.sha256()
        self.total = 0
        self.n_blocks = 0
        self.saved = 0
        self.alternatives: dict[int, tuple[int, bytes]] | None = {}  # spool offset -> (length, bytes)
        self.model_used = False

    def add(self, original: bytes, encoded: EncodedBlock) -> None:
        self.digest.update(original)
        self.total += len(original)
        self.n_blocks += 1
        offset = self.spool.tell()
        self.spool.write(encoded.data)
        if not encoded.uses_model:
            return
        self.model_used = True
        if encoded.alternative is None:  # fallback off: the model stays whatever it costs
            self.alternatives = None
        if self.alternatives is not None:
            self.saved += len(encoded.alternative) - len(encoded.data)
            self.alternatives[offset] = (len(encoded.data), encoded.alternative)
            if self.saved > self.KEEP_ALTERNATIVES_UNTIL:
                self.alternatives = None

    def finish(self, destination: BinaryIO, model_section) -> int:
        """Write header, blocks and trailer to ``destination``; returns the container's size."""
        body_size = self.spool.tell()
        with_model = fmt.write_header(fmt.Header(model_section())) if self.model_used else None
        without_model = fmt.write_header(fmt.Header(None))
        revert = self.model_used and self.alternatives is not None and (
            len(without_model) + self.saved <= len(with_model)
        )
        header = with_model if self.model_used and not revert else without_model
        trailer = fmt.write_trailer(fmt.Trailer(self.n_blocks, self.total, self.digest.digest()[: fmt.CHECKSUM_BYTES]))
        destination.write(header)
        self.spool.seek(0)
        if revert:
            body_size = self._copy_with_alternatives(destination, body_size)
        else:
            shutil.copyfileobj(self.spool, destination)
        destination.write(trailer)
        self.spool.close()
        return len(header) + body_size + len(trailer)

    def _copy_with_alternatives(self, destination: BinaryIO, body_size: int) -> int:
        written = position = 0
        for offset in sorted(self.alternatives):
            length, alternative = self.alternatives[offset]
            destination.write(self.spool.read(offset - position))
            destination.write(alternative)
            self.spool.seek(length, io.SEEK_CUR)
            written += offset - position + len(alternative)
            position = offset + length
        rest = self.spool.read(body_size - position)
        destination.write(rest)
        return written + len(rest)


def compress_stream(source: BinaryIO, destination: BinaryIO, settings: Settings, progress: Progress | None = None, session=None) -> Summary:
    """Compress everything ``source`` yields into ``destination``; memory stays at a few blocks."""
    compressor = Compressor(settings, progress, session)
    writer = ContainerWriter()
    for block in read_blocks(source, settings.block_size):
        writer.add(block, compressor.compress_block(block))
    size = writer.finish(destination, compressor.model_section)
    return Summary(writer.total, size, writer.n_blocks, writer.model_used)


def compress(data: bytes, progress: Progress | None = None, **options) -> bytes:
    """Compress ``data`` into a nacrith container.

    Options are the fields of :class:`Settings` (``streams``, ``ctx``, ``slide``,
    ``block_size``, ``model``, ``threads``, ...).
    """
    out = io.BytesIO()
    compress_stream(io.BytesIO(bytes(data)), out, Settings(**options), progress)
    return out.getvalue()


# --- decompression ------------------------------------------------------------------


@dataclass
class Decompressor:
    """Decodes the blocks of one parsed container."""

    container: fmt.Container
    model: str | None = None
    threads: int | None = None
    progress: Progress | None = None
    session: object = None
    _checked: bool = field(default=False, repr=False)

    def check(self):
        """Refuse up front what cannot be decoded exactly: wrong model, engine or backend."""
        section = self.container.header.model
        if not self.container.uses_model or self._checked:
            return
        from . import model as model_files
        from .engine import gpu_available
        from .session import Session, engine_name

        info = model_files.locate(self.model)
        if info.sha256 != section.sha256:
            raise ModelMismatchError(
                f"this file was made with model {section.name} (sha256 {section.sha256.hex()[:16]}…), "
                f"not {info.name} (sha256 {info.sha256.hex()[:16]}…); pass the right one with --model"
            )
        if section.engine != engine_name():
            raise BackendMismatchError(f"this file was made with {section.engine}; this is {engine_name()}, whose logits may differ")
        if section.predictor != LLMPredictor.settings:
            raise BackendMismatchError(f"this file uses predictor settings this nacrith does not know: {section.predictor}")
        if section.backend == "cuda" and not gpu_available():
            raise BackendMismatchError("this file was made on a CUDA GPU; this llama.cpp has no GPU support, and CPU logits differ")
        if section.backend not in ("cpu", "cuda"):
            raise BackendMismatchError(f"this file was made on an unknown backend {section.backend!r}")
        if self.session is None:
            self.session = Session(info.path, gpu=section.backend == "cuda", threads=self.threads)
        elif self.session.backend != section.backend:
            raise BackendMismatchError(f"this file was made on {section.backend}, the session runs on {self.session.backend}")
        self._checked = True

    def blocks(self) -> Iterator[bytes]:
        """The original bytes, block by block (checksum checked by the caller)."""
        self.check()
        for block in self.container.blocks:
            yield self.decode_block(block)

    def decode_block(self, block: fmt.Block) -> bytes:
        if block.kind == fmt.STORED:
            data = block.payload
        elif block.kind == fmt.ZSTD:
            data = zstd_decompress(block.payload, block.raw_length)
        else:
            data = self._decode_model_block(block)
        if len(data) != block.raw_length:
            raise CorruptError("corrupt container: a block decoded to the wrong length")
        if block.kind != fmt.MODEL and self.progress:
            self.progress(len(data))
        return data

    def _decode_model_block(self, block: fmt.Block) -> bytes:
        section = self.container.header.model
        session = self.session
        binary_size = block.raw_length - block.text_length
        binary = block.binary_payload
        if block.binary_codec == fmt.BINARY_ZSTD:
            binary = zstd_decompress(binary, binary_size)
        if len(binary) != binary_size:
            raise CorruptError("corrupt container: binary segments have the wrong length")
        lengths = list(block.stream_tokens)
        context = session.context(len(lengths), section.ctx)
        predictor = LLMPredictor(session.llama.n_vocab, len(lengths))
        progress = None
        if self.progress:
            per_token = block.raw_length / max(1, block.n_tokens)
            progress = lambda running: self.progress(running * per_token)  # noqa: E731
        try:
            lockstep = Lockstep(context, session.llama.bos, section.ctx, section.slide, predictor, progress)
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


def decompress_to(blob, destination: BinaryIO, progress: Progress | None = None, model: str | None = None, threads: int | None = None, session=None) -> int:
    """Decode the container in the bytes-like ``blob`` into ``destination``; returns the size.

    Everything is validated before the first byte is written except the final checksum:
    on :class:`CorruptError` the caller must discard what was written.
    """
    return decode_parsed(fmt.parse(blob), destination, progress, model, threads, session)


def decode_parsed(parsed: fmt.Container, destination: BinaryIO, progress: Progress | None = None, model: str | None = None, threads: int | None = None, session=None) -> int:
    """Like :func:`decompress_to` for a container already parsed with :func:`nacrith.container.parse`."""
    decompressor = Decompressor(parsed, model=model, threads=threads, progress=progress, session=session)
    digest = hashlib.sha256()
    for data in decompressor.blocks():
        digest.update(data)
        destination.write(data)
    if digest.digest()[: fmt.CHECKSUM_BYTES] != parsed.trailer.checksum:
        raise CorruptError("checksum mismatch: the restored data differs from the original (damaged file, or different logits on this machine)")
    return parsed.trailer.total_length


def decompress(blob: bytes, progress: Progress | None = None, model: str | None = None, threads: int | None = None) -> bytes:
    """Restore the original bytes from a nacrith container.

    ``model`` overrides the model file ($NACRITH_MODEL or the embedded default); it must be
    the one the container names.
    """
    out = io.BytesIO()
    decompress_to(blob, out, progress, model, threads)
    return out.getvalue()
