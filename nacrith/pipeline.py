"""Compression and decompression of whole inputs, block by block.

The input is cut into blocks of ``block_size`` bytes, each coded on its own
(:mod:`nacrith.blocks`). Blocks are independent, so worker processes (:mod:`nacrith.workers`) can code several at
once (:mod:`nacrith.reuse` keeps them, or one loaded model, from file to file); the
container (:mod:`nacrith.container`) records everything decoding needs. Decoding checks the
structure, then the model and the backend (:mod:`nacrith.compat`) before any model work,
and the checksum of the result after. :mod:`nacrith.settings` holds the levels and
:class:`Settings`.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from . import container as fmt
from .blocks import EncodedBlock, compress_block, decode_block, lockstep_streams, text_tokens  # noqa: F401  (re-exported)
from .compat import check_decodable, engine_of, model_section
from .errors import BackendMismatchError, CorruptError, NotNacrithError, SpoolError
from .model import locate as locate_model
from .predictors import model_alone
from .reuse import LocalSession, planned_workers, reuse_sessions, worker_pool
from .settings import Progress, Settings
from .workers import WorkerRequest

SPOOL_IN_MEMORY = 64 << 20  # bytes held in memory, more going to a temporary file: blocks being written, piped input


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


def compress_stream(source: BinaryIO, destination: BinaryIO, settings: Settings, progress: Progress | None = None, session=None, workers: int | str = 1,
                    ray: str | None = None) -> Summary:
    """Compress everything ``source`` yields into ``destination``; memory stays at a few blocks.

    ``workers`` > 1 (or "auto") codes several blocks at once in worker processes; the
    container is the same whatever the worker count. ``ray`` ("local", "auto" or a cluster's
    address) codes the blocks on Ray actors instead (:mod:`nacrith.cluster`; ``workers`` is
    then the number of actors, "auto" for one per cluster CPU): the same container again.
    """
    settings.validate()
    if session is not None and settings.use_model and (session.info.sha256 != locate_model(settings.model).sha256 or session.engine != settings.engine):
        session = None  # a session of another model or engine than the header will name: load that one instead
    writer = ContainerWriter()
    blocks = read_blocks(source, settings.block_size)
    size = remaining_size(source)
    n_blocks = None if size is None else max(1, -(-size // settings.block_size))
    if ray is not None:
        gpu_model = _compress_on_ray(ray, blocks, writer, settings, progress, workers, n_blocks)
    else:
        request = WorkerRequest(workers, settings.gpu, settings.streams, settings.ctx, settings.threads, settings.gpu_ids, n_blocks,
                                settings.model_only, settings.model, engine=settings.engine)
        plan = planned_workers(request)
        gpu_model = plan.gpu_model
        if plan.contexts <= 1 or session is not None:
            factory = LocalSession(settings.model, settings.gpu, plan.threads if settings.threads is None else settings.threads, session,
                                   plan.devices[0], settings.engine)
            for block in blocks:
                writer.add(block, compress_block(block, settings, factory, progress))
        else:
            with worker_pool(plan, settings.model, progress, request, settings.engine) as pool:
                for block, encoded in pool.compress(blocks, settings):
                    writer.add(block, encoded)
    size = writer.finish(destination, lambda: model_section(settings, gpu_model))
    return Summary(writer.total, size, writer.n_blocks, writer.model_used)


def _compress_on_ray(address: str, blocks: Iterator[bytes], writer: "ContainerWriter", settings: Settings, progress: Progress | None,
                     workers: int | str, n_blocks: int | None) -> str | None:
    """Code ``blocks`` on Ray actors into ``writer``; returns the GPUs' model name with ``settings.gpu``."""
    from . import cluster

    threads = settings.threads or 1
    with cluster.connect(address) as ray:
        actors = cluster.actor_count(ray, workers, settings.gpu, threads, n_blocks)
        sha256 = locate_model(settings.model).sha256 if settings.use_model else None
        with cluster.RayPool(ray, actors, settings.model, sha256, settings.gpu, threads, settings.engine, progress) as pool:
            gpu_model = pool.gpu_model() if settings.gpu and settings.engine != "exact" else None
            for block, encoded in pool.compress(blocks, settings):
                writer.add(block, encoded)
            cluster.LAST_REPORT[:] = pool.report()
    return gpu_model


def compress(data: bytes, progress: Progress | None = None, workers: int | str = 1, ray: str | None = None, **options) -> bytes:
    """Compress ``data`` into a nacrith container.

    Options are the fields of :class:`Settings` (``level``, ``streams``, ``ctx``, ``slide``,
    ``block_size``, ``model``, ``threads``, ``gpu``, ``ensemble``, ...); ``workers`` and
    ``ray`` as :func:`compress_stream` takes them.
    """
    out = io.BytesIO()
    compress_stream(io.BytesIO(bytes(data)), out, Settings(**options), progress, workers=workers, ray=ray)
    return out.getvalue()


# --- decompression ------------------------------------------------------------------


def decode_parsed(parsed: fmt.Container, destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                  threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                  any_cpu_build: bool = False, ray: str | None = None) -> int:
    """Decode a container parsed with :func:`nacrith.container.parse` into ``destination``.

    Everything is validated before the first byte is written except the final checksum:
    on :class:`CorruptError` the caller must discard what was written. Returns the size.
    A file made on a GPU decodes on GPUs of the model it records, else is refused
    (:class:`BackendMismatchError`), unless ``any_gpu_model``: then on the first GPU's
    model, the checksum alone telling whether its logits were the same. ``any_cpu_build``
    does the same for a CPU file of another llama.cpp CPU build (:func:`check_decodable`).
    ``ray``: decode the model blocks on Ray actors (:func:`compress_stream`). The exact
    engine's files decode on the CPU, or on GPUs where ``gpu_ids`` is given (``()``: all).
    """
    return _decode_checked(parsed, check_decodable(parsed, model, any_cpu_build), destination, progress, threads, session, workers, gpu_ids,
                           any_gpu_model, ray, model)


def _decode_checked(parsed: fmt.Container, model_path, destination: BinaryIO, progress: Progress | None, threads: int | None, session,
                    workers: int | str, gpu_ids, any_gpu_model: bool, ray: str | None = None, model: str | None = None) -> int:
    """:func:`decode_parsed` once :func:`check_decodable` has passed and given ``model_path``
    (``model``: what the caller named, for Ray's nodes to find theirs)."""
    section = parsed.header.model
    engine = engine_of(section.engine) if section is not None else "llama.cpp"
    # llama.cpp's GPU files decode on GPUs; the exact engine's files anywhere, on GPUs where asked (gpu_ids not None)
    gpu = section is not None and (section.backend_kind == "cuda" or (engine == "exact" and gpu_ids is not None))
    gpu_ids = gpu_ids or None  # () asks for every GPU
    if session is not None and parsed.uses_model and session.engine != engine:
        session = None  # a session of another engine: load the file's own
    if session is not None and parsed.uses_model and session.backend != section.backend_kind:
        raise BackendMismatchError(f"this file was made on {section.backend}, the session runs on {session.backend}")
    if session is not None and parsed.uses_model and session.info.sha256 != section.sha256:
        session = None  # a session of another model: load the file's own (``model_path``) instead
    digest = hashlib.sha256()
    model_blocks = sum(block.kind == fmt.MODEL for block in parsed.blocks)
    model_only = section is not None and model_alone(section.predictor)
    if ray is not None and model_blocks:
        _decode_on_ray(ray, parsed, model, digest, destination, progress, threads, workers, gpu, engine)
        if digest.digest()[: fmt.CHECKSUM_BYTES] != parsed.trailer.checksum:
            raise CorruptError("checksum mismatch: the restored data differs from the original (damaged file, or different logits on this machine)")
        return parsed.trailer.total_length
    request = WorkerRequest(workers, gpu, max((len(b.stream_tokens) for b in parsed.blocks), default=1), section.ctx if section else 0, threads,
                            gpu_ids, max(1, model_blocks), model_only, model_path,
                            section.gpu_model if gpu and engine != "exact" and not any_gpu_model else None, engine)
    plan = planned_workers(request)
    if plan.contexts <= 1 or model_blocks <= 1 or session is not None:
        factory = LocalSession(model_path, gpu, plan.threads if threads is None else threads, session, plan.devices[0], engine)
        decoded = (decode_block(block, section, factory, progress) for block in parsed.blocks)
        for data in decoded:
            digest.update(data)
            destination.write(data)
    else:
        with worker_pool(plan, model_path, progress, request, engine) as pool:
            for data in pool.decode(parsed.blocks, section):
                digest.update(data)
                destination.write(data)
    if digest.digest()[: fmt.CHECKSUM_BYTES] != parsed.trailer.checksum:
        raise CorruptError("checksum mismatch: the restored data differs from the original (damaged file, or different logits on this machine)")
    return parsed.trailer.total_length


def _decode_on_ray(address: str, parsed: fmt.Container, model: str | None, digest, destination: BinaryIO, progress: Progress | None,
                   threads: int | None, workers: int | str, gpu: bool, engine: str) -> None:
    """Decode ``parsed``'s blocks on Ray actors into ``destination``, feeding ``digest``."""
    from . import cluster

    section = parsed.header.model
    threads = threads or 1
    with cluster.connect(address) as ray:
        actors = cluster.actor_count(ray, workers, gpu, threads, sum(block.kind == fmt.MODEL for block in parsed.blocks))
        with cluster.RayPool(ray, actors, model, section.sha256, gpu, threads, engine, progress) as pool:
            if gpu and pool.gpu_model() != section.gpu_model and section.gpu_model is not None:
                raise BackendMismatchError(f"this file was made on a {section.gpu_model} GPU; the Ray cluster's are {pool.gpu_model()}")
            for data in pool.decode(parsed.blocks, section):
                digest.update(data)
                destination.write(data)
            cluster.LAST_REPORT[:] = pool.report()


def decode_members(members: list[fmt.Container], destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                   threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                   any_cpu_build: bool = False, ray: str | None = None) -> int:
    """Decode the containers :func:`nacrith.container.parse_members` found, one after another,
    into ``destination`` (the concatenation of their originals); returns the total size.
    Each is checked with :func:`check_decodable` before the first is decoded."""
    model_paths = [check_decodable(member, model, any_cpu_build) for member in members]
    with reuse_sessions():  # one model load for all the containers, not one each
        return sum(_decode_checked(member, model_path, destination, progress, threads, session, workers, gpu_ids, any_gpu_model, ray, model)
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
                      any_cpu_build: bool = False, ray: str | None = None) -> int:
    """Decode the container (or concatenated containers) read from ``source`` into
    ``destination``, memory bounded as :func:`parsed_stream` says; returns the size."""
    with parsed_stream(source) as (members, _):
        return decode_members(members, destination, progress, model, threads, session, workers, gpu_ids, any_gpu_model, any_cpu_build, ray)


def decompress_to(blob, destination: BinaryIO, progress: Progress | None = None, model: str | None = None,
                  threads: int | None = None, session=None, workers: int | str = 1, gpu_ids=None, any_gpu_model: bool = False,
                  any_cpu_build: bool = False, ray: str | None = None) -> int:
    """Decode the container (or concatenated containers) in the bytes-like ``blob`` into
    ``destination``; returns the size. The options are :func:`decode_parsed`'s."""
    return decode_members(fmt.parse_members(blob), destination, progress, model, threads, session, workers, gpu_ids, any_gpu_model, any_cpu_build,
                          ray)


def decompress(blob: bytes, progress: Progress | None = None, model: str | None = None, threads: int | None = None, workers: int | str = 1,
               any_gpu_model: bool = False, any_cpu_build: bool = False, ray: str | None = None, gpu_ids=None) -> bytes:
    """Restore the original bytes from a nacrith container (several concatenated ones give
    the concatenation of their originals).

    ``model`` overrides the model file ($NACRITH_MODEL or the embedded default); it must be
    the one the container names. ``any_gpu_model`` and ``any_cpu_build``: decode a file made
    on another GPU model, or by another llama.cpp CPU build, instead of refusing it up front
    (:func:`decode_parsed`); the checksum then tells whether the logits were the same.
    ``ray``: decode on Ray actors (:func:`compress_stream`). ``gpu_ids``: decode an exact
    engine's file on these GPUs (``()``: all; :func:`decode_parsed`).
    """
    out = io.BytesIO()
    decompress_to(blob, out, progress, model, threads, workers=workers, gpu_ids=gpu_ids, any_gpu_model=any_gpu_model, any_cpu_build=any_cpu_build,
                  ray=ray)
    return out.getvalue()
