"""Compression and decompression of whole inputs, block by block.

The input is cut into blocks of ``block_size`` bytes, each coded on its own:

* its text segments (:mod:`nacrith.segment`) are tokenized exactly, joined, cut into
  lockstep streams and range-coded with the predictor's distributions
  (:mod:`nacrith.lockstep`);
* its binary segments are joined and compressed with zstd -19 or xz -9e (or stored), whichever
  is smallest;
* the block is then stored as whichever of "model", "zstd", "xz" or "stored" is smallest.

Blocks are independent, so worker processes (:mod:`nacrith.workers`) can code several at
once; the container (:mod:`nacrith.container`) records everything decoding needs. Decoding
checks the structure, the model and the backend before any model work, and the checksum
of the result after.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np
import zstandard

from . import container as fmt
from .coder import CODERS, DEFAULT_CODER
from .engine import ATTENTION_MODES, default_attention
from .errors import BackendMismatchError, CorruptError, ModelMismatchError, ModelNotFoundError, NotNacrithError, SpoolError, UnsupportedVersionError
from .lockstep import Lockstep, check_window, split_streams
from .predictors import EnsembleConfig, make_predictor, model_alone, predictor_settings
from .segment import split_segments

ZSTD_LEVEL = 19
XZ_WORTH_TRYING = 0.97  # try xz only where zstd saved at least 3%: on noise it only costs time
# zstd -19 runs at ~2 MB/s even on noise; a level-1 probe (hundreds of MB/s) that saves under
# 1% marks data (compressed media, archives, ciphertext) as not worth the slow codecs
PROBE_LEVEL = 1
PROBE_WORTH_TRYING = 0.99
PLAIN_KINDS = {fmt.BINARY_STORED: fmt.STORED, fmt.BINARY_ZSTD: fmt.ZSTD, fmt.BINARY_XZ: fmt.XZ}  # whole-block kinds
BINARY_CODEC_OF_KIND = {kind: codec for codec, kind in PLAIN_KINDS.items()}

# Defaults, chosen from bench/tradeoff.py and bench/ablation.py on the 2-core development
# machine (see README).


@dataclass(frozen=True)
class Level:
    """What a compression level (``nacrith -1`` ... ``-9``) sets on the CPU: the most lockstep
    streams per block, each stream's context window, and the fewest tokens a stream gets
    (fewer tokens and a block uses fewer streams). Each level up has fewer streams or a longer
    window than the one below: a narrower batch is slower per token on the CPU, a stream
    that starts cold fewer times and sees more context predicts better (bench/levels.py)."""

    streams: int
    ctx: int
    min_stream_tokens: int


LEVELS = {
    1: Level(streams=64, ctx=512, min_stream_tokens=512),
    2: Level(streams=32, ctx=512, min_stream_tokens=512),
    3: Level(streams=16, ctx=512, min_stream_tokens=1024),
    4: Level(streams=16, ctx=768, min_stream_tokens=1024),
    5: Level(streams=16, ctx=1024, min_stream_tokens=1024),
    6: Level(streams=8, ctx=1024, min_stream_tokens=1024),
    7: Level(streams=8, ctx=2048, min_stream_tokens=2048),
    8: Level(streams=4, ctx=2048, min_stream_tokens=2048),
    9: Level(streams=1, ctx=2048, min_stream_tokens=2048),
}
DEFAULT_LEVEL = 5
DEFAULT_STREAMS = LEVELS[DEFAULT_LEVEL].streams
# On a GPU a llama_decode of 256 streams (llama.cpp's most sequences per context) yields
# 4.3 times the tokens of one of 16: 15.7k against 3.6k tokens/s on an H100 (README, "GPU");
# fewer streams would leave the GPU idle, for fewer bits. So there a level sets the window only.
DEFAULT_GPU_STREAMS = 256
DEFAULT_CTX = LEVELS[DEFAULT_LEVEL].ctx
DEFAULT_SLIDE = DEFAULT_CTX // 4
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_STREAM_TOKENS = LEVELS[DEFAULT_LEVEL].min_stream_tokens  # (bench/stream_floor.py)
MIN_GPU_STREAM_TOKENS = 512  # on a GPU, where the batch's width is the speed: a 300 KB input keeps ~160 streams
DEFAULT_ENSEMBLE = EnsembleConfig()
SPOOL_IN_MEMORY = 64 << 20  # bytes held in memory, more going to a temporary file: blocks being written, piped input

Progress = Callable[[float], None]


def level_of(number: int | None) -> Level:
    """The :class:`Level` numbered ``number`` (None: :data:`DEFAULT_LEVEL`)."""
    level = LEVELS.get(DEFAULT_LEVEL if number is None else number)
    if level is None:
        raise ValueError(f"level must be between {min(LEVELS)} and {max(LEVELS)}")
    return level


def default_streams(gpu: bool, level: int | None = None) -> int:
    """Lockstep streams per block when none are asked for: the level's on the CPU, many
    more on a GPU."""
    return DEFAULT_GPU_STREAMS if gpu else level_of(level).streams


def default_min_stream_tokens(gpu: bool, level: int | None = None) -> int:
    """The fewest tokens a stream gets when no floor is asked for: on the CPU, small inputs
    get fewer, longer streams (better bits); a GPU keeps its batch wide."""
    return MIN_GPU_STREAM_TOKENS if gpu else level_of(level).min_stream_tokens


def default_slide(ctx: int) -> int:
    """Tokens dropped from a full window of ``ctx`` when no slide is asked for: a quarter."""
    return max(1, ctx // 4)


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a container. ``model`` None means $NACRITH_MODEL or the default.

    ``level`` (1 to 9, None for :data:`DEFAULT_LEVEL`) fills in ``streams``, ``ctx``,
    ``slide`` and ``min_stream_tokens`` where they are None (:data:`LEVELS`; with ``gpu``,
    only the window); after construction every one of them is a number. The level itself is
    not recorded: the container records what it chose.
    """

    model: str | None = None
    streams: int | None = None  # None: DEFAULT_GPU_STREAMS with gpu, else the level's
    ctx: int | None = None  # None: the level's
    slide: int | None = None  # None: a quarter of ctx
    block_size: int = DEFAULT_BLOCK_SIZE
    min_stream_tokens: int | None = None  # None: MIN_GPU_STREAM_TOKENS with gpu, else the level's
    threads: int | None = None
    gpu: bool = False
    use_model: bool = True  # False: zstd/stored blocks only
    fallback: bool = True  # False: text blocks always use the model (for tests and measurements)
    ensemble: EnsembleConfig | None = DEFAULT_ENSEMBLE  # None: the language model alone
    gpu_ids: tuple | None = None  # with gpu: which GPUs the workers may use (None: all); not recorded
    attention: str | None = None  # one of engine.ATTENTION_MODES; None: the backend's default ("stable" on the CPU)
    coder: str = DEFAULT_CODER  # the range coder, one of coder.CODERS
    level: int | None = None  # None: DEFAULT_LEVEL

    def __post_init__(self):
        # resolved here, so that every reader of .streams, .ctx, ... sees a number
        level = level_of(self.level)
        object.__setattr__(self, "level", DEFAULT_LEVEL if self.level is None else self.level)
        if self.streams is None:
            object.__setattr__(self, "streams", default_streams(self.gpu, self.level))
        if self.ctx is None:
            object.__setattr__(self, "ctx", level.ctx)
        if self.slide is None:
            object.__setattr__(self, "slide", default_slide(self.ctx))
        if self.min_stream_tokens is None:
            object.__setattr__(self, "min_stream_tokens", default_min_stream_tokens(self.gpu, self.level))

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
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}")
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {', '.join(CODERS)}")
        return self

    @property
    def backend(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def attention_mode(self) -> str:
        """The flash-attention mode recorded in the container and used by the engine."""
        return self.attention or default_attention(self.backend)

    @property
    def predictor(self) -> dict:
        """The predictor settings recorded in the container."""
        return predictor_settings(self.ensemble)

    @property
    def model_only(self) -> bool:
        """Whether the model's distribution is coded alone, as the container will record it
        (an ensemble with every part off is recorded as the model alone)."""
        return model_alone(self.predictor)

    @property
    def predictor_name(self) -> str:
        """A short description of the predictor, for reports."""
        if self.model_only:
            return "llm-only"
        config = self.ensemble
        return "llm+" + "+".join(config.parts) + ("" if config.mix == "geometric" else f" ({config.mix})")

    def describe(self) -> dict:
        """The settings as a JSON-ready dict."""
        values = {name: getattr(self, name) for name in ("level", "streams", "ctx", "slide", "block_size", "min_stream_tokens", "threads", "gpu")}
        return {**values, "attention": self.attention_mode, "predictor": self.predictor}


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


def model_section(settings: Settings, gpu_model: str | None = None) -> fmt.ModelSection:
    """The header's model section for containers made with ``settings`` (no model loading),
    on GPUs named ``gpu_model`` (as ggml describes them) when ``settings.gpu``."""
    from . import model as model_files
    from .session import engine_name

    info = model_files.locate(settings.model)
    return fmt.ModelSection(
        sha256=info.sha256,
        name=info.name,
        engine=engine_name(),
        backend=recorded_backend(settings, gpu_model),
        ctx=settings.ctx,
        slide=settings.slide,
        predictor=settings.predictor,
        attention=settings.attention_mode,
        coder=settings.coder,
    )


def recorded_backend(settings: Settings, gpu_model: str | None = None) -> str:
    """What a container made with ``settings`` records as its backend: "cpu:" and this
    llama.cpp build's CPU arithmetic (:func:`nacrith.engine.cpu_build`), or "cuda:" and the
    GPUs' name."""
    if settings.gpu:
        return f"cuda:{gpu_model}" if gpu_model else settings.backend
    return cpu_backend()


def cpu_backend() -> str:
    """The backend a CPU file made by this llama.cpp build records: "cpu:" and the build's
    compact form (:func:`nacrith.container.cpu_build_field`, the same for the same features)."""
    from .engine import cpu_build

    return f"cpu:{fmt.cpu_build_field(cpu_build())}"


# Features of a llama.cpp CPU build that choose how the work is shared among threads, not
# the arithmetic: a clang build without OpenMP gave logits bit-identical to the gcc build
# with it, and each decoded the other's file exactly (README, "Compatibility: CPU builds").
THREADING_FEATURES = frozenset({"OPENMP"})


def arithmetic_of(build: str) -> tuple[str, frozenset]:
    """(architecture, features) of a CPU build as :func:`nacrith.engine.cpu_build` gives it,
    without :data:`THREADING_FEATURES`: builds whose logits may differ differ here."""
    arch, *features = build.split()
    return arch, frozenset(features) - THREADING_FEATURES


def cpu_build_mismatch(recorded: str, here: str) -> str:
    """Why a file made by the llama.cpp CPU build ``recorded`` is refused by the build
    ``here`` (both as :func:`nacrith.engine.cpu_build` gives them), in one line."""
    (made_on, *made), (this_on, *this) = recorded.split(), here.split()
    made, this = [f for f in made if f not in THREADING_FEATURES], [f for f in this if f not in THREADING_FEATURES]
    if made_on != this_on:
        return f"this file was made by llama.cpp on {made_on} CPUs; this is {this_on}, whose logits differ"
    lacking, extra = [f for f in made if f not in this], [f for f in this if f not in made]
    differences = "; ".join(part for part in (f"this one lacks {' '.join(lacking)}" if lacking else "",
                                              f"it lacked {' '.join(extra)}" if extra else "") if part)
    return (f"this file was made by a llama.cpp CPU build with other features ({differences}), whose logits differ;"
            " decode it with a build like the one that made it (README: Compatibility), or try --any-cpu-build")


# --- one block ----------------------------------------------------------------------


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


# --- whole inputs -------------------------------------------------------------------


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
        with temporary_file_errors():  # past 64 MiB the spool is a file in $TMPDIR, which may fill
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

    def finish(self, destination: BinaryIO, section: Callable[[], fmt.ModelSection]) -> int:
        """Write header, blocks and trailer to ``destination``; returns the container's size."""
        body_size = self.spool.tell()
        without_model = fmt.write_header(fmt.Header(None))
        header = fmt.write_header(fmt.Header(section())) if self.model_used else without_model
        revert = self.model_used and self.alternatives is not None and len(without_model) + self.saved <= len(header)
        if revert:
            header = without_model
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


class LocalSession:
    """A session created on first use in this process (for work without worker processes);
    inside :func:`reuse_sessions`, the one already loaded for the same model and device."""

    def __init__(self, model: str | None, gpu: bool, threads: int | None, session=None, main_gpu: int | None = None):
        self.model, self.gpu, self.threads, self.main_gpu = model, gpu, threads, main_gpu or 0
        self.session = session

    def __call__(self):
        if self.session is None:
            from . import model as model_files
            from .session import Session  # loads llama.cpp only when a block needs it

            if _reused is None:
                self.session = Session(self.model, gpu=self.gpu, threads=self.threads, main_gpu=self.main_gpu)
            else:
                info = model_files.locate(self.model)
                key = (info.path, info.sha256, self.gpu, self.threads, self.main_gpu)
                if key not in _reused:
                    _close_reused()  # one at a time: each holds a model and its contexts
                    _reused[key] = Session(info.path, gpu=self.gpu, threads=self.threads, main_gpu=self.main_gpu)
                self.session = _reused[key]
        return self.session


# in reuse_sessions(): (model file, SHA-256, GPU?, threads, GPU index) -> Session, and
# ("pool", WorkerPlan, model file, SHA-256) -> WorkerPool; one entry at a time
_reused: dict[tuple, object] | None = None


def planned_workers(*request):
    """:func:`nacrith.workers.plan_workers` for ``request`` (its arguments, in order).

    Inside :func:`reuse_sessions`, the plan of the pool kept from an earlier file when that
    file asked the same; else, for ``auto``, the plan once kept pools are stopped: they hold
    the memory (and GPU memory) that ``auto`` counts, and would otherwise shrink the next
    file's plan.
    """
    from . import workers

    kept_pools = [kept for kept in (_reused or {}).values() if isinstance(kept, workers.WorkerPool)]
    for pool in kept_pools:
        if pool.request == request:
            return pool.plan
    if kept_pools and workers.parse_workers(request[0])[0] == "auto":
        _close_reused()
    return workers.plan_workers(*request)


@contextmanager
def worker_pool(plan, model: str | None, progress: Progress | None, request: tuple = ()):
    """A :class:`nacrith.workers.WorkerPool` for ``plan``, shut down at the end of the block;
    inside :func:`reuse_sessions`, the pool already running for the same plan and model
    file, kept for the next file (its processes have their models loaded and contexts
    created). A pool whose file fails is stopped and dropped: blocks of that file may still
    be running in it. ``request``: what :func:`planned_workers` was asked for ``plan``.
    """
    from .workers import WorkerPool

    if _reused is None:
        with WorkerPool(plan, model, progress) as pool:
            yield pool
        return
    from . import model as model_files

    info = model_files.locate(model)
    key = ("pool", plan, info.path, info.sha256)
    if key not in _reused:
        _close_reused()  # one at a time: each holds models and their contexts
        _reused[key] = WorkerPool(plan, info.path, progress, reusable=True)
    pool = _reused[key]
    pool.progress, pool.request = progress, request
    try:
        yield pool
    except BaseException:
        del _reused[key]
        with pool:  # stops its processes now
            raise


@contextmanager
def reuse_sessions():
    """Within the block, a :class:`LocalSession` takes the session already loaded for the
    same model file (path and SHA-256), backend, GPU and thread count instead of loading
    the model again.

    Files coded one after another in one process (several FILES, ``-r DIR``, concatenated
    containers) then skip loading the model, building its piece table and creating
    contexts (about 0.3 s each with SmolLM2-135M). Files coded in worker processes do the
    same with :func:`worker_pool`: the next file of the same plan takes the same processes.
    Only the last key's session or pool is kept; the outermost block closes it. Blocks have
    always reused a session's contexts, each starting from a cleared KV cache, so reuse
    changes no file.
    """
    global _reused
    if _reused is not None:  # nested: the outer block owns the sessions
        yield
        return
    _reused = {}
    try:
        yield
    finally:
        _close_reused()
        _reused = None


def _close_reused() -> None:
    for session_or_pool in _reused.values():
        session_or_pool.close()
    _reused.clear()


def remaining_size(source: BinaryIO) -> int | None:
    """Bytes left in ``source`` when it is a regular file or an in-memory buffer, else None."""
    if isinstance(source, io.BytesIO):
        return max(0, len(source.getbuffer()) - source.tell())
    try:
        status = os.fstat(source.fileno())
        if stat.S_ISREG(status.st_mode):
            return max(0, status.st_size - source.tell())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    return None


def compress_stream(source: BinaryIO, destination: BinaryIO, settings: Settings, progress: Progress | None = None, session=None, workers: int | str = 1) -> Summary:
    """Compress everything ``source`` yields into ``destination``; memory stays at a few blocks.

    ``workers`` > 1 (or "auto") codes several blocks at once in worker processes; the
    container is the same whatever the worker count.
    """
    settings.validate()
    writer = ContainerWriter()
    blocks = read_blocks(source, settings.block_size)
    size = remaining_size(source)
    n_blocks = None if size is None else max(1, -(-size // settings.block_size))
    request = (workers, settings.gpu, settings.streams, settings.ctx, settings.threads, settings.gpu_ids, n_blocks, settings.model_only, settings.model)
    plan = planned_workers(*request)
    if plan.contexts <= 1 or session is not None:
        factory = LocalSession(settings.model, settings.gpu, plan.threads if settings.threads is None else settings.threads, session, plan.devices[0])
        for block in blocks:
            writer.add(block, compress_block(block, settings, factory, progress))
    else:
        with worker_pool(plan, settings.model, progress, request) as pool:
            for block, encoded in pool.compress(blocks, settings):
                writer.add(block, encoded)
    size = writer.finish(destination, lambda: model_section(settings, plan.gpu_model))
    return Summary(writer.total, size, writer.n_blocks, writer.model_used)


def compress(data: bytes, progress: Progress | None = None, workers: int | str = 1, **options) -> bytes:
    """Compress ``data`` into a nacrith container.

    Options are the fields of :class:`Settings` (``level``, ``streams``, ``ctx``, ``slide``,
    ``block_size``, ``model``, ``threads``, ``gpu``, ``ensemble``, ...).
    """
    out = io.BytesIO()
    compress_stream(io.BytesIO(bytes(data)), out, Settings(**options), progress, workers=workers)
    return out.getvalue()


# --- decompression ------------------------------------------------------------------


def check_decodable(parsed: fmt.Container, model: str | None = None, any_cpu_build: bool = False):
    """Refuse up front what cannot be decoded exactly; returns the model file to use (or None).

    Checks the model's SHA-256, the engine, the predictor settings and the backend: a CPU
    file that records its llama.cpp CPU build is refused by a build of other features
    (:data:`THREADING_FEATURES` aside) unless ``any_cpu_build`` (then the checksum tells
    whether the logits were the same).
    """
    section = parsed.header.model
    if not parsed.uses_model:
        return None
    from .engine import gpu_available, gpu_missing
    from .session import engine_name

    model_path = _decoding_model(section, model)
    if section.engine != engine_name():
        raise BackendMismatchError(f"this file was made with {section.engine}; this is {engine_name()}, whose logits may differ")
    try:
        make_predictor(section.predictor, 16, 1)
    except (ValueError, TypeError) as exc:
        raise UnsupportedVersionError(f"this file uses predictor settings this nacrith does not know ({exc})") from None
    if section.backend_kind not in ("cpu", "cuda"):
        raise BackendMismatchError(f"this file was made on an unknown backend {section.backend!r}")
    if section.attention not in ATTENTION_MODES:
        raise UnsupportedVersionError(f"this file uses an attention mode this nacrith does not know ({section.attention!r})")
    if section.coder not in CODERS:
        raise UnsupportedVersionError(f"this file uses a range coder this nacrith does not know ({section.coder!r})")
    if section.backend_kind == "cuda" and not gpu_available():
        raise BackendMismatchError(f"this file was made on a CUDA GPU; {gpu_missing()}, and CPU logits differ")
    if section.cpu_build is not None and not any_cpu_build:
        from .engine import cpu_build

        if arithmetic_of(section.cpu_build) != arithmetic_of(cpu_build()):
            raise BackendMismatchError(cpu_build_mismatch(section.cpu_build, cpu_build()))
    return model_path


def _decoding_model(section: fmt.ModelSection, model: str | None):
    """The model file whose SHA-256 the file records: ``model`` (--model) when given, else
    the usual choice ($NACRITH_MODEL, the default) or, failing that, the zoo model of that
    SHA-256 (:data:`nacrith.model.ZOO`), so that a file made with ``--model gemma3-270m``
    decodes without options where that model is installed."""
    from . import model as model_files

    try:
        info, missing = model_files.locate(model), None
    except ModelNotFoundError as exc:
        if model is not None:
            raise
        info, missing = None, exc
    if info is not None and info.sha256 == section.sha256:
        return info.path
    known = model_files.zoo_model_of(section.sha256)
    if known is not None and model is None:
        found = model_files.zoo_path(known)
        if found is None:
            raise ModelNotFoundError(f"this file was made with {section.name}, nacrith's {known.name} model, which is not installed;"
                                     f" install it with {known.install_hint}")
        if model_files.fingerprint(found) == section.sha256:
            return found
    if info is None:
        raise missing
    hint = f"--model {known.name}" if known is not None else "--model"
    raise ModelMismatchError(
        f"this file was made with model {section.name} (sha256 {section.sha256.hex()[:16]}…), "
        f"not {info.name} (sha256 {info.sha256.hex()[:16]}…); pass the right one with {hint}"
    )


def decode_parsed(parsed: fmt.Container, destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                  threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                  any_cpu_build: bool = False) -> int:
    """Decode a container parsed with :func:`nacrith.container.parse` into ``destination``.

    Everything is validated before the first byte is written except the final checksum:
    on :class:`CorruptError` the caller must discard what was written. Returns the size.
    A file made on a GPU decodes on GPUs of the model it records, else is refused
    (:class:`BackendMismatchError`), unless ``any_gpu_model``: then on the first GPU's
    model, the checksum alone telling whether its logits were the same. ``any_cpu_build``
    does the same for a CPU file of another llama.cpp CPU build (:func:`check_decodable`).
    """
    return _decode_checked(parsed, check_decodable(parsed, model, any_cpu_build), destination, progress, threads, session, workers, gpu_ids, any_gpu_model)


def _decode_checked(parsed: fmt.Container, model_path, destination: BinaryIO, progress: Progress | None, threads: int | None, session,
                    workers: int | str, gpu_ids, any_gpu_model: bool) -> int:
    """:func:`decode_parsed` once :func:`check_decodable` has passed and given ``model_path``."""
    section = parsed.header.model
    gpu = section is not None and section.backend_kind == "cuda"
    if session is not None and parsed.uses_model and session.backend != section.backend_kind:
        raise BackendMismatchError(f"this file was made on {section.backend}, the session runs on {session.backend}")
    digest = hashlib.sha256()
    model_blocks = sum(block.kind == fmt.MODEL for block in parsed.blocks)
    model_only = section is not None and model_alone(section.predictor)
    request = (workers, gpu, max((len(b.stream_tokens) for b in parsed.blocks), default=1), section.ctx if section else 0, threads, gpu_ids,
               max(1, model_blocks), model_only, model_path, section.gpu_model if gpu and not any_gpu_model else None)
    plan = planned_workers(*request)
    if plan.contexts <= 1 or model_blocks <= 1 or session is not None:
        factory = LocalSession(model_path, gpu, plan.threads if threads is None else threads, session, plan.devices[0])
        decoded = (decode_block(block, section, factory, progress) for block in parsed.blocks)
        for data in decoded:
            digest.update(data)
            destination.write(data)
    else:
        with worker_pool(plan, model_path, progress, request) as pool:
            for data in pool.decode(parsed.blocks, section):
                digest.update(data)
                destination.write(data)
    if digest.digest()[: fmt.CHECKSUM_BYTES] != parsed.trailer.checksum:
        raise CorruptError("checksum mismatch: the restored data differs from the original (damaged file, or different logits on this machine)")
    return parsed.trailer.total_length


def decode_members(members: list[fmt.Container], destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                   threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                   any_cpu_build: bool = False) -> int:
    """Decode the containers :func:`nacrith.container.parse_members` found, one after another,
    into ``destination`` (the concatenation of their originals); returns the total size.
    Each is checked with :func:`check_decodable` before the first is decoded."""
    model_paths = [check_decodable(member, model, any_cpu_build) for member in members]
    with reuse_sessions():  # one model load for all the containers, not one each
        return sum(_decode_checked(member, model_path, destination, progress, threads, session, workers, gpu_ids, any_gpu_model)
                   for member, model_path in zip(members, model_paths))


@contextmanager
def parsed_stream(source: BinaryIO, name: str = "the input") -> Iterator[tuple[list[fmt.Container], int]]:
    """(the containers that ``source`` holds, their size in bytes), for use inside the block.

    A regular file read from its start is parsed where it is, its block payloads left on
    disk until decoded (read with pread, not mapped: see :class:`nacrith.container.FileData`).
    Another stream (a pipe) is read into memory up to :data:`SPOOL_IN_MEMORY` bytes, and past
    that copied to an unnamed temporary file first, so that memory stays bounded.
    """
    with _file_or_bytes(source) as (handle, blob):
        size = len(blob) if handle is None else os.fstat(handle.fileno()).st_size
        if size == 0:
            raise NotNacrithError(f"{name}: empty input is not a nacrith file")
        yield (fmt.parse_members(blob) if handle is None else fmt.parse_file(handle, name)), size


@contextmanager
def _file_or_bytes(source: BinaryIO):
    """(a regular file, None) holding what ``source`` holds, or (None, its bytes)."""
    if remaining_size(source) is not None and not isinstance(source, io.BytesIO) and source.tell() == 0:
        yield source, None
        return
    head = source.read(SPOOL_IN_MEMORY + 1)
    if len(head) <= SPOOL_IN_MEMORY:
        yield None, head
        return
    with tempfile.TemporaryFile(prefix="nacrith-") as spool:
        _spool(spool, head, source)
        del head  # (this frame lives on while the caller decodes)
        yield spool, None


def _spool(spool: BinaryIO, head: bytes, source: BinaryIO) -> None:
    """Write ``head`` and the rest of ``source`` to ``spool``, a temporary file."""
    chunk = head
    while chunk:
        with temporary_file_errors():
            spool.write(chunk)
        chunk = source.read(1 << 20)
    with temporary_file_errors():
        spool.flush()


@contextmanager
def temporary_file_errors():
    """An OSError of a temporary file's own write (a full $TMPDIR) as :class:`SpoolError`,
    which names the folder: it was reported against the input being read."""
    try:
        yield
    except OSError as exc:
        raise SpoolError(f"cannot write a temporary file in {tempfile.gettempdir()} ({exc.strerror or exc})") from None


def decompress_stream(source: BinaryIO, destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                      threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                      any_cpu_build: bool = False) -> int:
    """Decode the container (or concatenated containers) read from ``source`` into
    ``destination``, memory bounded as :func:`parsed_stream` says; returns the size."""
    with parsed_stream(source) as (members, _):
        return decode_members(members, destination, progress, model, threads, session, workers, gpu_ids, any_gpu_model, any_cpu_build)


def decompress_to(blob, destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                  threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                  any_cpu_build: bool = False) -> int:
    """Decode the container (or concatenated containers) in the bytes-like ``blob`` into
    ``destination``; returns the size. The options are :func:`decode_parsed`'s."""
    return decode_members(fmt.parse_members(blob), destination, progress, model, threads, session, workers, gpu_ids, any_gpu_model, any_cpu_build)


def decompress(blob: bytes, progress: Progress | None = None, model: str | None = None, threads: int | None = None, workers: int | str = 1,
               any_gpu_model: bool = False, any_cpu_build: bool = False) -> bytes:
    """Restore the original bytes from a nacrith container (several concatenated ones give
    the concatenation of their originals).

    ``model`` overrides the model file ($NACRITH_MODEL or the embedded default); it must be
    the one the container names. ``any_gpu_model`` and ``any_cpu_build``: decode a file made
    on another GPU model, or by another llama.cpp CPU build, instead of refusing it up front
    (:func:`decode_parsed`); the checksum then tells whether the logits were the same.
    """
    out = io.BytesIO()
    decompress_to(blob, out, progress, model, threads, workers=workers, any_gpu_model=any_gpu_model, any_cpu_build=any_cpu_build)
    return out.getvalue()
