"""Worker processes: several engine contexts coding blocks at once, on CPU cores or GPUs.

Each worker is a process holding one model and its contexts on one device (a GPU chosen
by ``main_gpu``, no layer splitting; or the CPU with its share of the cores). The parent
reads the input block by block, keeps at most two blocks per worker in flight, and writes
finished blocks in input order, so memory stays at a few blocks whatever the input size.

Blocks are independent and a block's streams always run together in one context, so the
container does not depend on how many workers made it. On the CPU logits also do not depend
on the thread count (the exact engine's never do; llama.cpp's with attention modes "off" and
"stable", see :mod:`nacrith.engine`), so a file may be decoded with any worker count; on
CUDA, with any worker count on the same kind of GPU.

A worker may run several "lanes": threads with a context (and model) each, coding blocks
side by side (``--workers PxL``: P processes of L lanes). Both engines release the GIL
while they compute a step, so one lane's model step overlaps the other lanes' CPU work, and on a GPU the
kernels of one process's contexts may run at the same time, where those of different
processes take turns (``bench/experiments/lanes.py`` measures both).
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from . import container as fmt
from .errors import BackendMismatchError, ModelNotFoundError, WorkerError
from .settings import default_threads

IN_FLIGHT_PER_WORKER = 2
FINAL_PROGRESS_WAIT = 5.0  # seconds the parent waits for a file's last progress messages (they come within milliseconds)
MAX_PROCESSES_PER_GPU = 8  # measured on an H100 at 256 streams: 8 processes reach 85% of raw decode, 4 only 58%
# The model alone on a GPU: 2 processes of 4 lanes each. On an H200 at 256 streams they coded
# 3 MB of bible.txt at 96% (compress) and 100% (decompress) of their raw rate of 44.3k tokens/s,
# where 8 processes of 1 lane reached 20.0k (90% of 22.2k) and 1 x 4 27.2k (64% of 42.9k)
# (bench/results/throughput-gpu.json). With the ensemble, 8 x 1 stays: 8 x 2 and 16 x 1 coded
# 1 MB slower (7.4k and 6.1k tokens/s against 9.8k; two lanes share one process's GIL).
MODEL_ONLY_GPU_LAYOUT = (2, 4)  # processes per GPU, lanes per process
GPU_MEMORY_MARGIN = 1 << 30  # per worker, for llama.cpp's compute buffers and CUDA itself
BYTES_PER_KV_CELL = 64 << 10  # where the model's header cannot be read: a bound for small models (SmolLM2-135M: 22.5 KiB)
# per CPU worker beside its KV cache: the model's pages, compute buffers, Python and the
# ensemble's tables (up to ~420 MiB over a full 1 MiB text block:
# bench/results/memory-cpu-v4-block.md). With SmolLM2-135M's KV cache at 16 streams x 1024
# tokens (360 MiB) that reserves 1.0 GiB per worker, where a worker measured near 0.8 GiB (bench/memory.py).
CPU_MEMORY_MARGIN = 640 << 20
# The part of that margin that grows with the model: its file (mapped) and, per vocabulary
# entry, the ensemble's context bias table and its AdaGrad squares (256 rows of float32 each)
# and each stream's int64 probability row. gemma3-270m (253 MB, 262,144 tokens) compressing
# 30 KB peaked at 1238 MiB RSS against 658 MiB for SmolLM2-135M (/usr/bin/time, docs/benchmarks.md, "Models").
ENSEMBLE_BYTES_PER_VOCAB_ENTRY = 2 * 256 * 4
DEFAULT_MODEL_BYTES, DEFAULT_VOCAB = 98_362_432, 49_152  # SmolLM2-135M, whose figures the margin holds


@dataclass(frozen=True)
class WorkerPlan:
    """How many processes to run, with how many lanes and CPU threads (per context) each, on which GPUs."""

    processes: int
    threads: int
    devices: tuple  # main_gpu per process; None for the CPU
    lanes: int = 1  # contexts per process, each coding its own block in its own thread
    gpu_model: str | None = None  # the name of the GPUs in devices (all of one model); None for the CPU

    @property
    def contexts(self) -> int:
        return self.processes * self.lanes


def parse_workers(requested) -> tuple:
    """(processes or "auto", lanes) from ``--workers``: N, "auto" or "PxL"."""
    if requested == "auto":
        return "auto", 1
    processes, by, lanes = str(requested).partition("x")
    try:
        processes, lanes = int(processes), int(lanes) if by else 1
    except ValueError:
        raise ValueError(f"workers must be a number, 'auto' or PROCESSESxLANES, got {requested!r}") from None
    if processes < 1 or lanes < 1:
        raise ValueError("workers and lanes must be at least 1")
    return processes, lanes


@dataclass(frozen=True)
class WorkerRequest:
    """What a job asks of the workers: :func:`plan_workers`'s arguments, named.

    Two files that make the same request get the same plan, so a pool kept from one file
    serves the next (:func:`nacrith.reuse.planned_workers`).
    """

    workers: int | str = 1  # --workers: N, "auto" or "PxL"
    gpu: bool = False
    streams: int = 1  # lockstep streams per block (the widest block's, when decoding)
    ctx: int = 0  # tokens in a stream's window
    threads: int | None = None  # CPU threads per context; None: the cores shared out
    gpu_ids: tuple | None = None  # which GPUs may be used; None: all
    blocks: int | None = None  # blocks the job has, where known: no more contexts than that
    model_only: bool = False  # no ensemble (lets "auto" run lanes on a GPU)
    model_path: object = None  # the model file, for its KV cache size; None: the default model
    gpu_model: str | None = None  # the GPU model a file was made on (decoding), else None
    engine: str | None = None  # the engine the workers run (None: the default for gpu)

    def plan(self) -> "WorkerPlan":
        """:func:`plan_workers` of this request."""
        return plan_workers(requested=self.workers, gpu=self.gpu, streams=self.streams, ctx=self.ctx, threads=self.threads, gpu_ids=self.gpu_ids,
                            blocks=self.blocks, model_only=self.model_only, model_path=self.model_path, gpu_model=self.gpu_model,
                            engine=self.engine)


def plan_workers(requested, gpu: bool, streams: int, ctx: int, threads: int | None = None, gpu_ids=None, blocks: int | None = None,
                 model_only: bool = False, model_path=None, gpu_model: str | None = None, engine: str | None = None) -> WorkerPlan:
    """Resolve ``--workers N|PxL|auto`` for the CPU or the GPUs (``gpu_ids``: which ones, None for all).

    llama.cpp's GPUs are all of one model, since its logits differ between GPU models:
    ``gpu_model`` (a file's, when decoding), else the first GPU's; the others are left out.
    A ``gpu_model`` that no GPU here has is refused (:class:`BackendMismatchError`). The
    exact engine (``engine``) runs on every GPU PyTorch sees, of any model: its integers
    are the same on all of them.

    ``blocks``, when known, caps the contexts: a worker or lane without a block would only
    take CPU threads from the others. ``model_only`` (no ensemble) lets ``auto`` on a GPU
    run lanes, :data:`MODEL_ONLY_GPU_LAYOUT`. ``auto`` sizes each context's KV cache from
    the header of the model at ``model_path`` (None: the default model), or from
    :data:`BYTES_PER_KV_CELL` where that cannot be read.
    """
    cores = default_threads()
    requested, lanes = parse_workers(requested)
    auto_gpu_lanes = gpu and requested == "auto" and model_only
    if auto_gpu_lanes:  # contexts are capped at half the cores, as processes are below
        lanes = max(1, min(MODEL_ONLY_GPU_LAYOUT[1], cores // 2))
    if blocks is not None:
        lanes = max(1, min(lanes, blocks))
        blocks = -(-blocks // lanes)  # the processes that the lanes leave work for
    if gpu:
        from .errors import EngineError
        from .settings import resolve_engine

        exact = resolve_engine(engine, True) == "exact"
        if exact:
            from .exact.torch_engine import cuda_devices as gpus
        else:
            from .devices import gpus
        found = [device for device in gpus() if gpu_ids is None or device.index in gpu_ids]
        if not found:
            raise EngineError(f"no GPU visible to {'PyTorch' if exact else 'llama.cpp'}" + ("" if gpu_ids is None else f" among {sorted(gpu_ids)}")
                              + f" (see `make {'install-gpu' if exact else 'install-cuda'}`)")
        model = None if exact else gpu_model or found[0].description  # exact: any GPU model, the same integers everywhere
        if model is not None and not any(device.description == model for device in found):
            names = ", ".join(sorted({device.description for device in found}))
            here = "this machine has" if gpu_ids is None else f"GPUs {','.join(map(str, sorted(gpu_ids)))} are"
            raise BackendMismatchError(f"this file was made on a {model} GPU; logits differ between GPU models, and {here} {names}"
                                       " (--any-gpu-model tries anyway: the checksum tells whether it decoded)")
        found = [device for device in found if model is None or device.description == model]
        if requested == "auto" and exact:  # one process per GPU: the batch of its streams is the GPU's work
            devices = tuple(device.index for device in found)
        elif requested == "auto":
            per_context = kv_cell_bytes(model_path) * streams * max(ctx, 1) + GPU_MEMORY_MARGIN
            most = MODEL_ONLY_GPU_LAYOUT[0] if auto_gpu_lanes else MAX_PROCESSES_PER_GPU
            per_gpu = [max(1, min(most, device.free_bytes // (per_context * lanes))) for device in found]
            # one process per GPU in turn, so that the cap on cores leaves every GPU some
            devices = tuple(device.index for turn in range(max(per_gpu)) for device, count in zip(found, per_gpu) if turn < count)
            devices = devices[: max(1, cores // 2 // lanes)]
        else:
            devices = tuple(found[i % len(found)].index for i in range(int(requested)))
        devices = devices[: max(1, blocks)] if blocks is not None else devices
        return WorkerPlan(len(devices), threads or max(1, cores // (len(devices) * lanes)), devices, lanes, model)
    # CPU: one single-threaded process per core beats one process using every core (on 2
    # cores, 2 x 1 thread measured 6-9% faster than 1 x 2 in bench/results/workers-cpu.json;
    # 2 processes also beat 1 process of 2 lanes in
    # workers-cpu-v4.json: parts of the ensemble hold Python's GIL), as long as memory holds a
    # context per process.
    processes = min(cores, _processes_fitting_in_memory(streams, ctx, model_path)) if requested == "auto" else int(requested)
    processes = max(1, min(processes, blocks) if blocks is not None else processes)
    return WorkerPlan(processes, threads or max(1, cores // (processes * lanes)), (None,) * processes, lanes)


_headers_read: dict[tuple, tuple] = {}  # (path, size, mtime) -> gguf.header_facts of the file


def _model_facts(model_path=None) -> tuple[int, int | None, int | None] | None:
    """(file bytes, KV cache bytes per cell, vocabulary size) of the model, None where it
    cannot be found; each model file's header is read once per process (about 65 ms), and
    again once the file changed."""
    from . import gguf
    from .model import resolve_model_path

    try:
        path = resolve_model_path(model_path)
        stat = os.stat(path)
    except (OSError, ModelNotFoundError):
        return None
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _headers_read:
        _headers_read[key] = gguf.header_facts(path)
    return (stat.st_size, *_headers_read[key])


def kv_cell_bytes(model_path=None) -> int:
    """KV cache bytes per token cell of the model (:func:`nacrith.gguf.kv_cell_bytes`), or the bound."""
    facts = _model_facts(model_path)
    return (facts and facts[1]) or BYTES_PER_KV_CELL


def model_size(model_path=None) -> tuple[int, int]:
    """(file bytes, vocabulary size) of the model, SmolLM2-135M's where they cannot be read."""
    facts = _model_facts(model_path)
    if facts is None:
        return DEFAULT_MODEL_BYTES, DEFAULT_VOCAB
    return facts[0], facts[2] or DEFAULT_VOCAB


def cpu_worker_bytes(streams: int, ctx: int, model_path=None) -> int:
    """The memory a CPU worker is reckoned to need: its KV cache and CPU_MEMORY_MARGIN,
    grown by what the model's file and vocabulary take beyond SmolLM2-135M's."""
    file_bytes, vocab = model_size(model_path)
    per_entry = ENSEMBLE_BYTES_PER_VOCAB_ENTRY + 8 * streams
    growth = max(0, file_bytes - DEFAULT_MODEL_BYTES) + max(0, vocab - DEFAULT_VOCAB) * per_entry
    return kv_cell_bytes(model_path) * streams * max(ctx, 1) + CPU_MEMORY_MARGIN + growth


def _processes_fitting_in_memory(streams: int, ctx: int, model_path=None) -> int:
    """How many CPU workers the available memory holds (:func:`cpu_worker_bytes` each)."""
    per_worker = cpu_worker_bytes(streams, ctx, model_path)
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 16  # not Linux: no cap
    return max(1, available // per_worker)


# --- inside a worker ------------------------------------------------------------------

_worker: dict = {}
_lane = threading.local()  # each lane thread's own Session
_reporting = threading.Lock()  # progress counts shared by the lanes


def _initialize(model_path, threads: int, devices, progress_queue, lanes: int = 1, engine: str | None = None) -> None:
    _worker.update(model_path=model_path, threads=threads, device=devices.get(), progress_queue=progress_queue, pending=0.0, sent=time.monotonic(), engine=engine,
                   lanes=ThreadPoolExecutor(lanes, thread_name_prefix="nacrith-lane") if lanes > 1 else None)


def _session():
    session = getattr(_lane, "session", None)
    if session is None:
        from .session import Session

        device = _worker["device"]
        session = _lane.session = Session(_worker["model_path"], gpu=device is not None, threads=_worker["threads"], main_gpu=device or 0,
                                          engine=_worker["engine"])
    return session


def _progress(amount: float) -> None:
    """Report progress to the parent at most a few times a second, as (amount, False)."""
    with _reporting:
        _worker["pending"] += amount
        now = time.monotonic()
        if now - _worker["sent"] > 0.25:
            _worker["progress_queue"].put((_worker["pending"], False))
            _worker["pending"], _worker["sent"] = 0.0, now


def _end_of_job() -> None:
    """Report the job's unreported progress and its end, as (amount, True): the parent counts
    these to know when every message of a file's jobs has reached it."""
    with _reporting:
        if _worker["progress_queue"] is not None:
            _worker["progress_queue"].put((_worker["pending"], True))
            _worker["pending"] = 0.0


def _in_lanes(function, items: list) -> list:
    """``function`` applied to each item, the items side by side in the worker's lanes.

    With lanes, every item runs in a lane thread, even a lone last one: the process's main
    thread would otherwise load a model and context of its own beside the lanes' ones.
    """
    lanes = _worker["lanes"]
    try:
        if lanes is None:
            return [function(item) for item in items]
        return list(lanes.map(function, items))
    finally:
        _end_of_job()


def _compress_job(blocks: list, settings) -> list:
    from .blocks import compress_block

    progress = _progress if _worker["progress_queue"] is not None else None
    return _in_lanes(lambda data: compress_block(data, settings, _session, progress), blocks)


def _decode_job(blocks: list, section) -> list:
    from .blocks import decode_block

    progress = _progress if _worker["progress_queue"] is not None else None
    return _in_lanes(lambda block: decode_block(block, section, _session, progress), blocks)


# --- in the parent ---------------------------------------------------------------------


class WorkerPool:
    """A pool of worker processes that returns results in submission order."""

    def __init__(self, plan: WorkerPlan, model_path, progress: Callable[[float], None] | None = None, reusable: bool = False,
                 engine: str | None = None):
        """``reusable``: the pool may code several files (:func:`nacrith.reuse.worker_pool`),
        each with its own ``progress`` (set :attr:`progress` between them), so its workers
        report progress even when this first file shows none. ``engine``: what the workers
        run the model with (:data:`nacrith.session.ENGINES`; None: the default)."""
        context = multiprocessing.get_context("spawn")  # llama.cpp's threads do not survive fork
        self.plan = plan
        self.progress = progress
        self.request: WorkerRequest | None = None  # what was asked for plan (see nacrith.reuse.planned_workers)
        self.progress_queue = context.Queue() if progress or reusable else None
        self.unreported_jobs = 0  # submitted jobs whose end has not come through progress_queue
        devices = context.Queue()
        for device in plan.devices:
            devices.put(device)
        model = None if model_path is None else os.fspath(model_path)
        self.executor = ProcessPoolExecutor(plan.processes, mp_context=context, initializer=_initialize, initargs=(model, plan.threads, devices, self.progress_queue, plan.lanes, engine))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:  # an error or an interrupt: the blocks still running are lost anyway
            self.terminate()
        self.close()

    def close(self) -> None:
        """Wait for the running blocks, then stop the worker processes."""
        self.executor.shutdown(wait=True, cancel_futures=True)

    def terminate(self) -> None:
        """Stop the worker processes now, not after the blocks they are coding (minutes).

        Python 3.14 and later do this with ``ProcessPoolExecutor.terminate_workers``. Before,
        the executor had no public way to reach its processes; its ``_processes`` (an
        implementation detail of CPython) is read defensively, so that a Python without it only
        falls back to waiting for the running blocks instead of failing here.
        """
        if hasattr(self.executor, "terminate_workers"):
            self.executor.terminate_workers()
            return
        for process in list((getattr(self.executor, "_processes", None) or {}).values()):
            if process.is_alive():
                process.terminate()

    def compress(self, blocks: Iterable[bytes], settings) -> Iterator[tuple[bytes, object]]:
        """(block, EncodedBlock) for each input block, in order."""
        return self._ordered(blocks, lambda group: (_compress_job, (group, settings)))

    def decode(self, blocks: Iterable[fmt.Block], section) -> Iterator[bytes]:
        """The decoded bytes of each parsed block, in order."""
        blocks = (block.read_in() for block in blocks)  # bytes to pickle, read from disk one at a time
        return (result for _, result in self._ordered(blocks, lambda group: (_decode_job, (group, section))))

    def _ordered(self, items: Iterable, job: Callable) -> Iterator[tuple]:
        """(item, result) for each item, in order; a job codes a group of one item per lane."""
        waiting: collections.deque = collections.deque()
        limit = IN_FLIGHT_PER_WORKER * self.plan.processes
        items = iter(items)
        exhausted = False
        while waiting or not exhausted:
            while not exhausted and len(waiting) < limit:
                group = [item for _, item in zip(range(self.plan.lanes), items)]
                if not group:
                    exhausted = True
                    break
                function, arguments = job(group)
                waiting.append((group, self.executor.submit(function, *arguments)))
                self.unreported_jobs += self.progress_queue is not None
            if waiting:
                group, future = waiting.popleft()
                yield from zip(group, self._result(future))
        self._drain(until_all_reported=True)  # all of it now: the next file (a kept pool) must not get this one's progress

    def _result(self, future):
        while True:
            try:
                result = future.result(timeout=0.2)
                self._drain()
                return result
            except FutureTimeout:
                self._drain()
            except BrokenProcessPool:
                raise WorkerError("a worker process stopped unexpectedly (killed, or out of memory?)") from None

    def _drain(self, until_all_reported: bool = False) -> None:
        """Pass the workers' progress messages on to :attr:`progress`; ``until_all_reported``:
        wait (a few seconds at most) for the end of every submitted job. A result can reach
        the parent before the progress its worker sent just before it (another pipe)."""
        if self.progress_queue is None:
            return
        deadline = time.monotonic() + FINAL_PROGRESS_WAIT
        while True:
            wait = deadline - time.monotonic() if until_all_reported and self.unreported_jobs else 0
            try:
                amount, job_ended = self.progress_queue.get(timeout=wait) if wait > 0 else self.progress_queue.get_nowait()
            except Exception:  # queue.Empty
                if until_all_reported:
                    self.unreported_jobs = 0  # what did not come in time is given up: the next file must not wait for it
                return
            self.unreported_jobs -= job_ended
            if self.progress is not None and amount:
                self.progress(amount)
