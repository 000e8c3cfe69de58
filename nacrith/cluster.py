"""Blocks coded on a Ray cluster: actors that each keep one loaded model.

``--ray local`` starts Ray on this machine; ``--ray HOST:PORT`` (or ``ray://HOST:PORT``, or
``auto`` for ``RAY_ADDRESS`` or the cluster already running here) joins a running cluster.
The parent reads the input block by block, as it does for local worker processes, sends each
block to an actor (:class:`BlockCoder`: one :class:`~nacrith.session.Session` per actor,
loaded on its first block, on one GPU with ``--gpus`` through Ray's ``num_gpus``), and writes
the finished blocks in input order into one container. A block is coded exactly as a local
worker codes it (:mod:`nacrith.blocks`), so the container is byte for byte the local one of
the same settings, and it decodes with or without Ray.

Memory: at most :data:`IN_FLIGHT_PER_ACTOR` blocks per actor are in flight (sent, or coded
and not yet written), whatever the input's size; the parent holds those blocks and their
results, so its memory is bounded by ``2 x actors x block size`` beside what the container
writer spools.

Faults: an actor whose process dies is restarted by Ray (``max_restarts``) and its block
retried (``max_task_retries``); past those, the block goes to a fresh actor, up to
:data:`BLOCK_TRIES` times. Errors of the block itself (a model missing on a node, another
file under the model's name, damaged data) are raised in the parent as the
:class:`~nacrith.errors.NacrithError` they are, in one line. Ctrl-C kills the actors.

Ray is an optional extra (``pip install 'nacrith[ray]'``, ``make install-ray``); without it
``--ray`` says so in one line (:class:`~nacrith.errors.ClusterError`).
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from . import container as fmt
from .errors import ClusterError, ModelMismatchError, ModelNotFoundError, NacrithError

INSTALL_HINT = "pip install 'nacrith[ray]' (or make install-ray)"
IN_FLIGHT_PER_ACTOR = 2
BLOCK_TRIES = 3  # fresh actors a block is tried on after Ray's own restarts and retries
ACTOR_RESTARTS = 2  # Ray's max_restarts and max_task_retries of each actor
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address before saying it cannot be reached
ACTOR_OPTIONS: dict = {}  # extra ray.remote options for the actors (tests give a runtime_env here)
LAST_REPORT: list[str] = []  # RayPool.report() of the last job, for `nacrith -v`


def require_ray():
    """The ``ray`` module, or :class:`ClusterError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse, within :data:`CONNECT_TIMEOUT`, an address nothing listens on: Ray itself
    retries such an address for minutes."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return  # Ray finds the cluster running here, or says there is none at once
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except ValueError:
        raise ClusterError(f"--ray expects 'local', 'auto' or HOST:PORT, got {address!r}") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})") from None


@contextmanager
def connect(address: str):
    """Ray, started on this machine (``local``) or joined at ``address``, shut down at the
    end; where this process is already connected (a test, or a caller that set Ray up), that
    connection is used and left as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address != "local":
        _check_reachable(address)
        options["address"] = address
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({' '.join(str(exc).split())[:200]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


class BlockCoder:
    """A Ray actor's work: blocks coded and decoded with one session, loaded on first use.

    ``model`` is what the parent was given (None, a zoo name or a path), resolved on the
    actor's node; ``sha256`` the model the job needs, which that node's file must be.
    """

    def __init__(self, model, sha256: bytes | None, gpu: bool, threads: int, engine: str):
        self.model, self.sha256, self.gpu, self.threads, self.engine = model, sha256, gpu, threads, engine
        self.session = None
        self.node = socket.gethostname()

    def _session(self):
        if self.session is None:
            from . import model as model_files
            from .session import Session

            try:
                info, missing = model_files.locate(self.model), None
            except ModelNotFoundError as exc:
                info, missing = None, exc
            if info is None or (self.sha256 is not None and info.sha256 != self.sha256):
                known = model_files.zoo_model_of(self.sha256) if self.sha256 is not None else None
                found = model_files.zoo_path(known) if known is not None else None
                if found is not None and model_files.fingerprint(found) == self.sha256:
                    info = model_files.locate(found)
                elif info is None:
                    raise ModelNotFoundError(f"on Ray node {self.node}: {missing}")
                else:
                    raise ModelMismatchError(f"on Ray node {self.node} the model {info.name} is another file (sha256 {info.sha256.hex()[:16]}…)"
                                             f" than the job's (sha256 {self.sha256.hex()[:16]}…)")
            self.session = Session(info.path, gpu=self.gpu, threads=self.threads, engine=self.engine)
        return self.session

    def compress(self, data: bytes, settings) -> tuple:
        """(the :class:`~nacrith.blocks.EncodedBlock` of ``data``, node, seconds)."""
        from .blocks import compress_block

        began = time.perf_counter()
        return compress_block(data, settings, self._session), self.node, time.perf_counter() - began

    def decode(self, block: fmt.Block, section) -> tuple:
        """(the original bytes of a parsed block read in, node, seconds)."""
        from .blocks import decode_block

        began = time.perf_counter()
        return decode_block(block, section, self._session), self.node, time.perf_counter() - began

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def gpu_model(self) -> str | None:
        """The name of the GPU Ray gave this actor, as ggml describes it (None without one)."""
        from .devices import gpus

        found = gpus()
        return found[0].description if found else None


class RayPool:
    """Actors on a connected Ray cluster, coding blocks in input order (the interface of
    :class:`nacrith.workers.WorkerPool`)."""

    def __init__(self, ray, actors: int, model, sha256: bytes | None, gpu: bool, threads: int, engine: str,
                 progress: Callable[[float], None] | None = None):
        self.ray = ray
        self.progress = progress
        self.arguments = (model, sha256, gpu, threads, engine)
        self.remote = ray.remote(num_cpus=threads, num_gpus=1 if gpu else 0, max_restarts=ACTOR_RESTARTS,
                                 max_task_retries=ACTOR_RESTARTS, **ACTOR_OPTIONS)(BlockCoder)
        self.actors = [self._new_actor() for _ in range(max(1, actors))]
        self.nodes: dict[str, list] = {}  # node -> [blocks, bytes, seconds]

    def _new_actor(self):
        return self.remote.remote(*self.arguments)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop the actors now (their blocks, if any, are lost: an error or an interrupt)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []

    def compress(self, blocks: Iterable[bytes], settings) -> Iterator[tuple[bytes, object]]:
        """(block, EncodedBlock) for each input block, in order."""
        return self._ordered(blocks, "compress", settings, len)

    def decode(self, blocks: Iterable[fmt.Block], section) -> Iterator[bytes]:
        """The decoded bytes of each parsed block, in order."""
        blocks = (block.read_in() for block in blocks)
        return (result for _, result in self._ordered(blocks, "decode", section, lambda block: block.raw_length))

    def _submit(self, index: int, method: str, item, extra):
        return getattr(self.actors[index], method).remote(item, extra)

    def _ordered(self, items: Iterable, method: str, extra, size: Callable) -> Iterator[tuple]:
        waiting: collections.deque = collections.deque()  # [item, reference, actor index, tries]
        items, exhausted, turn = iter(items), False, 0
        while waiting or not exhausted:
            while not exhausted and len(waiting) < IN_FLIGHT_PER_ACTOR * len(self.actors):
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                index = turn % len(self.actors)
                turn += 1
                waiting.append([item, self._submit(index, method, item, extra), index, 1])
            if waiting:
                entry = waiting[0]
                result = self._result(entry, method, extra)
                if result is None:
                    continue  # resubmitted to a fresh actor
                waiting.popleft()
                value, node, seconds = result
                counts = self.nodes.setdefault(node, [0, 0, 0.0])
                counts[0] += 1
                counts[1] += size(entry[0])
                counts[2] += seconds
                if self.progress is not None:
                    self.progress(size(entry[0]))
                yield entry[0], value

    def _result(self, entry: list, method: str, extra):
        """The result of ``entry``'s task; None where its actor died and it went to a fresh one."""
        from ray import exceptions

        try:
            return self.ray.get(entry[1])
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, NacrithError):
                raise cause from None
            raise ClusterError(f"a Ray actor failed: {type(cause or exc).__name__}: {' '.join(str(cause or exc).split())[:300]}") from None
        except exceptions.RayActorError:
            if entry[3] >= BLOCK_TRIES:
                raise ClusterError(f"Ray actors kept dying while coding a block ({entry[3]} tries); the job is stopped") from None
            self.actors[entry[2]] = self._new_actor()
            entry[1] = self._submit(entry[2], method, entry[0], extra)
            entry[3] += 1
            return None

    def gpu_model(self) -> str:
        """The model of the actors' GPUs; :class:`ClusterError` where they differ or have none
        (logits differ between GPU models, and a file records one)."""
        names = set(self.ray.get([actor.gpu_model.remote() for actor in self.actors]))
        if None in names:
            raise ClusterError("--gpus with --ray: an actor sees no GPU")
        if len(names) > 1:
            raise ClusterError(f"--gpus with --ray: the cluster's GPUs are of several models ({', '.join(sorted(names))}); logits differ between them")
        return names.pop()

    def report(self) -> list[str]:
        """One line per node: blocks, bytes and the rate its actors coded at."""
        return [f"ray: {node}: {blocks} blocks, {size} bytes, {size / 1000 / seconds:.2f} KB/s per actor" if seconds else
                f"ray: {node}: {blocks} blocks, {size} bytes"
                for node, (blocks, size, seconds) in sorted(self.nodes.items())]


def actor_count(ray, workers, gpu: bool, threads: int, blocks: int | None) -> int:
    """How many actors: ``workers`` when it is a number; for "auto", one per ``threads`` CPUs
    of the cluster, or one per GPU with ``gpu``; never more than ``blocks``."""
    from .workers import parse_workers

    processes, lanes = parse_workers(workers)
    if lanes != 1:
        raise ClusterError("--workers PxL (lanes) does not apply with --ray: give the number of actors")
    if processes == "auto":
        resources = ray.cluster_resources()
        count = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1)) // max(1, threads)
        if gpu and count < 1:
            raise ClusterError("--gpus with --ray: the Ray cluster has no GPU")
    else:
        count = processes
    count = max(1, count)
    return min(count, blocks) if blocks else count
