"""The nacrith container, format version 5: writing it, reading it, validating it.

``docs/format.md`` is the normative specification: primitives, header, blocks, trailer,
how a model block decodes, validation rules and their error classes, the table entries
(:data:`TABLES`, :data:`CPU_FEATURES`; a test checks that the document lists the same),
version history and the conformance vectors. In brief::

    file    := member+                 each member decodes to its original; a file to their concatenation
    member  := header block* trailer
    header  := "NCRT" version(u8 = 5) body_length(varint) body crc32(u32)
    block   := "B" body_length(varint) body crc32(u32) payload      kind 0 stored, 1 zstd, 2 model, 3 xz
    trailer := "E" n_blocks(varint) total_length(varint) sha256(original)[:8] crc32(u32)

:func:`parse` checks every CRC, every length and the trailer's totals before returning,
so a decoder can refuse a damaged file before any model work. Versions 1 to 4 are read too.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field, replace

from .errors import CorruptError, InputChangedError, NotNacrithError, TruncatedError, UnsupportedVersionError

MAGIC = b"NCRT"
VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
LEGACY_ATTENTION = "auto"  # versions 1 and 2 have no attention field
LEGACY_CODER = "constriction"  # versions 1 to 3 have no coder field
ATTENTION_CODES = ("auto", "off", "on", "stable")  # the attention byte's values
BLOCK_TAG = b"B"
TRAILER_TAG = b"E"
CHECKSUM_BYTES = 8

STORED, ZSTD, MODEL, XZ = 0, 1, 2, 3
BLOCK_KINDS = {STORED: "stored", ZSTD: "zstd", MODEL: "model", XZ: "xz"}
BINARY_STORED, BINARY_ZSTD, BINARY_XZ = 0, 1, 2
BINARY_CODECS = {BINARY_STORED: "stored", BINARY_ZSTD: "zstd", BINARY_XZ: "xz"}
XZ_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME},)  # dict_size 64 MiB

# The tstr tables of version 5, per field. APPEND ONLY: files name entries by position.
TABLES = {
    "model_sha256": ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # nacrith.model.ZOO's, in hex
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                     "0c1d3326cd9793cfb7296113c063dd5c24e2bd734b48ec1a3d01b7158eca9387"),
    "model_name": ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1-as-Q8_0.gguf"),
    "engine": ("llama.cpp (llama-cpp-python 0.3.36)", "exact (spec 1)"),
    "backend": ("cpu", "cuda", "cpu:x86_64/520000f7", "any"),  # cpu:...: `make install`'s build (see CPU_FEATURES); any: the exact engine
    "predictor": ('{"ensemble":"v4","llm":"exp2-q64"}', '{"llm":"exp2-q64"}', '{"ensemble":"v5","llm":"exp2-q64"}'),
    "coder": ("int24", "constriction"),
}


# The CPU features that llama.cpp's system info may report, append-only: a CPU file records
# the build that made it as "cpu:" ARCH "/" a hex mask of these (bit i: CPU_FEATURES[i]),
# then "+" NAME for each feature not listed here. `make install`'s portable build,
# "x86_64 SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 LLAMAFILE OPENMP REPACK", is "x86_64/520000f7".
CPU_FEATURES = ("SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI",
                "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "NEON", "ARM_FMA", "FP16_VA", "MATMUL_INT8", "SVE",
                "DOTPROD", "SME", "SME2", "RISCV_V", "VSX", "VXE", "WASM_SIMD", "LLAMAFILE", "ACCELERATE",
                "CPU_HBM", "OPENMP", "KLEIDIAI", "REPACK")  # llama.cpp 0.3.36's on/off features, in its order


def cpu_build_field(build: str) -> str:
    """The compact form (``x86_64/520000f7``) of a CPU build as :func:`nacrith.engine.cpu_build`
    gives it (``x86_64 SSE3 SSSE3 ...``); the same for the same features in any order."""
    arch, *features = build.split()
    mask = sum(1 << CPU_FEATURES.index(name) for name in set(features) if name in CPU_FEATURES)
    return f"{arch}/{mask:x}" + "".join(f"+{name}" for name in sorted(set(features) - set(CPU_FEATURES)))


def cpu_build_names(field: str) -> str:
    """:func:`cpu_build_field`'s inverse (``x86_64 SSE3 SSSE3 ...``, CPU_FEATURES' order
    first); a field not of that form (another nacrith's) as it is."""
    arch, slash, rest = field.partition("/")
    mask, *others = rest.split("+")
    try:
        bits = int(mask, 16)
    except ValueError:
        bits = -1
    if not slash or bits < 0:
        return field
    return " ".join([arch, *(name for index, name in enumerate(CPU_FEATURES) if bits >> index & 1), *others])


def checksum(data) -> bytes:
    """The container's checksum of original bytes: SHA-256, first 8 bytes."""
    return hashlib.sha256(data).digest()[:CHECKSUM_BYTES]


# --- primitive encoders -------------------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def put_str(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    put_varint(out, len(raw))
    out += raw


def put_u32(out: bytearray, value: int) -> None:
    out += struct.pack("<I", value)


def put_entry(out: bytearray, field: str, key: str) -> bool:
    """``key``'s position in ``field``'s table (1-based), and True; else 0, and False: the
    caller then writes the value itself."""
    table = TABLES[field]
    put_varint(out, table.index(key) + 1 if key in table else 0)
    return key in table


def put_tstr(out: bytearray, field: str, text: str) -> None:
    """``text`` as a *tstr* of ``field``: its position in the field's table, else 0 and the string."""
    if not put_entry(out, field, text):
        put_str(out, text)


def put_sha256(out: bytearray, digest: bytes) -> None:
    """A model's SHA-256 as version 5 writes it: its table position, else 0 and the 32 bytes."""
    if not put_entry(out, "model_sha256", digest.hex()):
        out += digest


def predictor_json(settings: dict) -> str:
    """The predictor settings as the header writes them (and as :data:`TABLES` lists them)."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


class Reader:
    """Reads primitives from a bytes-like object, raising container errors at its end."""

    def __init__(self, data, offset: int = 0, end: int | None = None, what: str = "container"):
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > self.end:
            raise TruncatedError(f"truncated {self.what}: needs {n} more bytes at offset {self.offset}")
        chunk = bytes(self.data[self.offset:self.offset + n])
        self.offset += n
        return chunk

    def view(self, n: int):
        """The next ``n`` bytes without copying them (payloads): a memoryview, or a
        :class:`FilePayload` where the data is a :class:`FileData`."""
        if n < 0 or self.offset + n > self.end:
            raise TruncatedError(f"truncated {self.what}: needs {n} more bytes at offset {self.offset}")
        if isinstance(self.data, FileData):
            chunk = FilePayload(self.data, self.offset, n)
        else:
            chunk = memoryview(self.data)[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def varint(self) -> int:
        value = shift = 0
        for _ in range(10):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise CorruptError(f"corrupt {self.what}: varint too long at offset {self.offset}")

    def tstr(self, field: str) -> str:
        """A *tstr* of ``field`` (see :data:`TABLES`)."""
        entry = self.varint()
        return self.str() if entry == 0 else table_entry(field, entry)

    def sha256(self) -> bytes:
        """A model's SHA-256 as version 5 writes it (see :func:`put_sha256`)."""
        entry = self.varint()
        return self.take(32) if entry == 0 else bytes.fromhex(table_entry("model_sha256", entry))

    def str(self) -> str:
        raw = self.take(self.varint())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptError(f"corrupt {self.what}: invalid text field") from None


def table_entry(field: str, entry: int) -> str:
    """Entry ``entry`` (1-based) of ``field``'s table; one this nacrith does not know is refused."""
    table = TABLES[field]
    if entry > len(table):
        raise UnsupportedVersionError(f"this file names {field} entry {entry}, which this nacrith does not know (a newer nacrith made it)")
    return table[entry - 1]


class FileData:
    """A regular file as the bytes-like object :func:`parse` reads, fetched on demand with
    ``os.pread`` (a window cached for the many small reads of headers).

    Where an mmap of the file would kill the process with SIGBUS when another process
    truncates the file during a long decode (leaving the partial output behind), a short
    read here is :class:`InputChangedError`. Payloads stay on disk as :class:`FilePayload`
    until a block is decoded, so memory does not grow with the file.
    """

    WINDOW = 1 << 16

    def __init__(self, descriptor: int, size: int, name: str = "the input"):
        self.descriptor, self.size, self.name = descriptor, size, name
        self._window_start, self._window = 0, b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _ = index.indices(self.size)
        stop = max(start, stop)
        window_end = self._window_start + len(self._window)
        if not (self._window_start <= start and stop <= window_end):
            if stop - start > self.WINDOW:
                return self.read(start, stop - start)
            self._window_start, self._window = start, self.read(start, min(self.WINDOW, self.size - start))
        return self._window[start - self._window_start:stop - self._window_start]

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; the file must still hold them."""
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(self.descriptor, length - done, offset + done)
            if not chunk:
                raise InputChangedError(f"{self.name} shrank while being read (another process changed it)")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)


class FilePayload:
    """``length`` bytes at ``offset`` of a :class:`FileData`, read when asked for."""

    CHUNK = 1 << 20

    def __init__(self, data: FileData, offset: int, length: int):
        self.data, self.offset, self.length = data, offset, length

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return self.data.read(self.offset, self.length)

    def crc32(self) -> int:
        """zlib's CRC-32 of the bytes, read a chunk at a time."""
        crc = 0
        for start in range(0, self.length, self.CHUNK):
            crc = zlib.crc32(self.data.read(self.offset + start, min(self.CHUNK, self.length - start)), crc)
        return crc


def payload_crc32(payload) -> int:
    """CRC-32 of a payload held in memory or still on disk."""
    return payload.crc32() if isinstance(payload, FilePayload) else zlib.crc32(payload)


# --- header -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection:
    """What decoding a model block needs to reproduce the encoder's probabilities."""

    sha256: bytes
    name: str
    engine: str
    backend: str
    ctx: int
    slide: int
    predictor: dict = field(default_factory=dict)
    attention: str = LEGACY_ATTENTION  # the engine's flash-attention mode
    coder: str = LEGACY_CODER  # the range coder (nacrith.coder.CODERS)

    @property
    def backend_kind(self) -> str:
        """The backend without the GPU's name: "cpu" or "cuda" (or what a newer nacrith wrote)."""
        return self.backend.split(":", 1)[0]

    @property
    def gpu_model(self) -> str | None:
        """The name of the GPU model the file was made on, where the file records it."""
        kind, _, name = self.backend.partition(":")
        return name if kind == "cuda" and name else None

    @property
    def cpu_build(self) -> str | None:
        """The llama.cpp CPU build a CPU file was made with, where the file records it: its
        architecture and compiled features as :func:`nacrith.engine.cpu_build` names them
        (the field holds :func:`cpu_build_field`'s compact form)."""
        kind, _, build = self.backend.partition(":")
        return cpu_build_names(build) if kind == "cpu" and build else None


@dataclass(frozen=True)
class Header:
    """The file header: the model section is None when no block uses the model."""

    model: ModelSection | None = None
    version: int = VERSION  # the version read (written files are always VERSION)


def write_header(header: Header) -> bytes:
    body = bytearray()
    put_varint(body, 1 if header.model else 0)
    if header.model:
        model = header.model
        if len(model.sha256) != 32:
            raise ValueError("model_sha256 must be 32 bytes")
        put_sha256(body, model.sha256)
        put_tstr(body, "model_name", model.name)
        put_tstr(body, "engine", model.engine)
        put_tstr(body, "backend", model.backend)
        if model.attention not in ATTENTION_CODES:
            raise ValueError(f"unknown attention mode {model.attention!r}")
        body.append(ATTENTION_CODES.index(model.attention))
        put_varint(body, model.ctx)
        put_varint(body, model.slide)
        put_tstr(body, "predictor", predictor_json(model.predictor))
        put_tstr(body, "coder", model.coder)
    out = bytearray(MAGIC)
    out.append(VERSION)
    put_varint(out, len(body))
    out += body
    put_u32(out, zlib.crc32(out))
    return bytes(out)


def read_header(data, offset: int = 0) -> tuple[Header, int]:
    """Parse the header at ``offset`` of ``data``; returns it and the offset after it."""
    if bytes(data[offset:offset + len(MAGIC)]) != MAGIC:
        raise NotNacrithError("not a nacrith file (bad magic bytes)")
    reader = Reader(data, offset + len(MAGIC), what="header")
    version = reader.u8()
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(f"unsupported container version {version} (this nacrith reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    body_length = reader.varint()
    body_start = reader.offset
    reader.take(body_length)
    crc_end = reader.offset
    if reader.u32() != zlib.crc32(bytes(data[offset:crc_end])):
        raise CorruptError("corrupt container: header checksum mismatch")
    body = Reader(data, body_start, crc_end, what="header")
    flags = body.varint()
    model = None
    if flags & 1:
        text = body.tstr if version >= 5 else (lambda field: body.str())
        sha = body.sha256() if version >= 5 else body.take(32)
        name, engine, backend = text("model_name"), text("engine"), text("backend")
        attention = _attention_name(body.u8()) if version >= 3 else LEGACY_ATTENTION
        ctx, slide = body.varint(), body.varint()
        try:
            predictor = json.loads(text("predictor"))
        except json.JSONDecodeError:
            raise CorruptError("corrupt container: predictor settings are not JSON") from None
        if not isinstance(predictor, dict):
            raise CorruptError("corrupt container: predictor settings are not a JSON object")
        coder = text("coder") if version >= 4 else LEGACY_CODER
        model = ModelSection(sha, name, engine, backend, ctx, slide, predictor, attention, coder)
    if flags & ~1:
        raise UnsupportedVersionError(f"container uses unknown header flags 0x{flags:x}")
    if body.offset != crc_end:
        raise CorruptError("corrupt container: header has trailing bytes")
    return Header(model, version), reader.offset


def _attention_name(code: int) -> str:
    """The attention mode of a header byte; unknown codes are refused when decoding starts."""
    return ATTENTION_CODES[code] if code < len(ATTENTION_CODES) else f"unknown ({code})"


# --- blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One block's description and its payload (bytes when built, a memoryview when parsed)."""

    kind: int
    raw_length: int
    payload: bytes | memoryview = b""
    segments: tuple = ()  # ((is_text, length), ...) for model blocks
    binary_codec: int = BINARY_STORED
    binary_length: int = 0
    stream_tokens: tuple = ()
    coded_length: int = 0
    payload_crc: int | None = None  # as the file records it (parsed blocks only)

    def read_in(self) -> "Block":
        """This block with its payload as bytes, ready to decode or to send to a worker. A
        payload still on disk is read now and checked again against its CRC: the file may
        have changed since :func:`parse` checked it."""
        if not isinstance(self.payload, FilePayload):
            return replace(self, payload=bytes(self.payload))
        payload = bytes(self.payload)
        if zlib.crc32(payload) != self.payload_crc:
            raise InputChangedError(f"{self.payload.data.name} changed while being read (another process wrote to it)")
        return replace(self, payload=payload)

    @property
    def binary_payload(self) -> bytes:
        return self.payload[: self.binary_length]

    @property
    def coded(self) -> bytes:
        return self.payload[self.binary_length:]

    @property
    def n_tokens(self) -> int:
        return sum(self.stream_tokens)

    @property
    def text_length(self) -> int:
        return sum(length for is_text, length in self.segments if is_text)


def write_block(block: Block) -> bytes:
    body = bytearray([block.kind])
    put_varint(body, block.raw_length)
    if block.kind in (ZSTD, XZ):
        put_varint(body, len(block.payload))
    elif block.kind == MODEL:
        put_varint(body, len(block.segments))
        body.append(1 if block.segments and block.segments[0][0] else 0)
        for _, length in block.segments:
            put_varint(body, length)
        body.append(block.binary_codec)
        put_varint(body, block.binary_length)
        put_varint(body, len(block.stream_tokens))
        for count in block.stream_tokens:
            put_varint(body, count)
        put_varint(body, block.coded_length)
    put_u32(body, zlib.crc32(block.payload))
    out = bytearray(BLOCK_TAG)
    put_varint(out, len(body))
    out += body
    put_u32(out, zlib.crc32(out))
    return bytes(out) + bytes(block.payload)


def read_block(data, offset: int) -> tuple[Block, int]:
    """Parse the block at ``offset``; returns it (payload included) and the offset after it."""
    reader = Reader(data, offset, what="block")
    if reader.take(1) != BLOCK_TAG:
        raise CorruptError(f"corrupt container: expected a block at offset {offset}")
    body_length = reader.varint()
    body_start = reader.offset
    reader.take(body_length)
    if reader.u32() != zlib.crc32(bytes(data[offset:body_start + body_length])):
        raise CorruptError(f"corrupt container: block header checksum mismatch at offset {offset}")
    body = Reader(data, body_start, body_start + body_length, what="block")
    kind = body.u8()
    raw_length = body.varint()
    fields: dict = {}
    if kind == STORED:
        payload_length = raw_length
    elif kind in (ZSTD, XZ):
        payload_length = body.varint()
    elif kind == MODEL:
        fields = _read_model_fields(body, raw_length)
        payload_length = fields["binary_length"] + fields["coded_length"]
    else:
        raise CorruptError(f"corrupt container: unknown block kind {kind}")
    payload_crc = body.u32()
    if body.offset != body.end:
        raise CorruptError("corrupt container: block header has trailing bytes")
    payload = reader.view(payload_length)
    if payload_crc32(payload) != payload_crc:
        raise CorruptError(f"corrupt container: block payload checksum mismatch at offset {offset}")
    return Block(kind=kind, raw_length=raw_length, payload=payload, payload_crc=payload_crc, **fields), reader.offset


def _read_model_fields(body: Reader, raw_length: int) -> dict:
    n_segments = body.varint()
    if n_segments > raw_length:
        raise CorruptError("corrupt container: more segments than bytes")
    is_text = bool(body.u8())
    segments = []
    for _ in range(n_segments):
        segments.append((is_text, body.varint()))
        is_text = not is_text
    if sum(length for _, length in segments) != raw_length or any(length == 0 for _, length in segments):
        raise CorruptError("corrupt container: segment lengths do not add up to the block length")
    binary_codec = body.u8()
    if binary_codec not in BINARY_CODECS:
        raise CorruptError(f"corrupt container: unknown binary codec {binary_codec}")
    binary_length = body.varint()
    n_streams = body.varint()
    text_length = sum(length for text, length in segments if text)
    if n_streams > max(text_length, 0):
        raise CorruptError("corrupt container: more streams than text bytes")
    stream_tokens = tuple(body.varint() for _ in range(n_streams))
    if any(a < b for a, b in zip(stream_tokens, stream_tokens[1:])) or (stream_tokens and stream_tokens[-1] == 0):
        raise CorruptError("corrupt container: stream lengths are not non-increasing and positive")
    if sum(stream_tokens) > text_length or (text_length and not stream_tokens):
        raise CorruptError("corrupt container: token counts do not fit the text length")
    coded_length = body.varint()
    if coded_length % 4:
        raise CorruptError("corrupt container: coded length is not a multiple of 4")
    return dict(
        segments=tuple(segments),
        binary_codec=binary_codec,
        binary_length=binary_length,
        stream_tokens=stream_tokens,
        coded_length=coded_length,
    )


# --- trailer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Trailer:
    n_blocks: int
    total_length: int
    checksum: bytes


def write_trailer(trailer: Trailer) -> bytes:
    out = bytearray(TRAILER_TAG)
    put_varint(out, trailer.n_blocks)
    put_varint(out, trailer.total_length)
    out += trailer.checksum
    put_u32(out, zlib.crc32(out))
    return bytes(out)


def read_trailer(data, offset: int) -> tuple[Trailer, int]:
    reader = Reader(data, offset, what="trailer")
    if reader.take(1) != TRAILER_TAG:
        raise CorruptError(f"corrupt container: expected the trailer at offset {offset}")
    n_blocks, total_length = reader.varint(), reader.varint()
    digest = reader.take(CHECKSUM_BYTES)
    if reader.u32() != zlib.crc32(bytes(data[offset:reader.offset - 4])):
        raise CorruptError("corrupt container: trailer checksum mismatch")
    return Trailer(n_blocks, total_length, digest), reader.offset


# --- whole file ---------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """One parsed container (a member of the file)."""

    header: Header
    blocks: list
    trailer: Trailer
    size: int = 0  # bytes it spans in the file

    @property
    def uses_model(self) -> bool:
        return any(block.kind == MODEL for block in self.blocks)


def parse(data) -> Container:
    """Parse and validate the one container that ``data`` holds (a bytes-like object or a
    :class:`FileData`); several concatenated ones are :func:`parse_members`' to read."""
    members = parse_members(data)
    if len(members) > 1:
        raise CorruptError(f"{len(members)} concatenated containers where one was expected (see parse_members)")
    return members[0]


def parse_members(data) -> list[Container]:
    """Parse and validate every container in ``data``, one after another (gzip's members:
    ``nacrith -c a b > ab.nc`` writes two, which decode to a's bytes then b's)."""
    members, offset = [], 0
    while True:
        members.append(read_member(data, offset))
        offset += members[-1].size
        if offset == len(data):
            return members
        if bytes(data[offset:offset + len(MAGIC)]) != MAGIC:
            raise CorruptError(f"corrupt container: {len(data) - offset} unexpected bytes after the trailer")


def read_member(data, start: int) -> Container:
    """The container at ``start`` of ``data``, validated; its ``size`` says where it ends."""
    header, offset = read_header(data, start)
    blocks = []
    while offset < len(data) and data[offset:offset + 1] == BLOCK_TAG:
        block, offset = read_block(data, offset)
        blocks.append(block)
    if offset >= len(data):
        raise TruncatedError("truncated container: the trailer is missing")
    trailer, offset = read_trailer(data, offset)
    if trailer.n_blocks != len(blocks):
        raise CorruptError(f"corrupt container: trailer counts {trailer.n_blocks} blocks, found {len(blocks)}")
    if trailer.total_length != sum(block.raw_length for block in blocks):
        raise CorruptError("corrupt container: block lengths do not add up to the original length")
    if any(block.kind == MODEL for block in blocks) and header.model is None:
        raise CorruptError("corrupt container: a model block but no model section")
    if header.version < 2 and any(block.kind == XZ or block.binary_codec == BINARY_XZ for block in blocks):
        raise CorruptError("corrupt container: xz data in a version 1 file")
    return Container(header, blocks, trailer, offset - start)


def parse_file(handle, name: str = "the input") -> list[Container]:
    """:func:`parse_members` of the regular file open as ``handle``, leaving block payloads
    on disk: :meth:`Block.read_in` fetches each when it is decoded. The file must stay open
    while the blocks are used."""
    return parse_members(FileData(handle.fileno(), os.fstat(handle.fileno()).st_size, name))
