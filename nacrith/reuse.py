"""A loaded model kept from one file to the next: a :class:`LocalSession` in this process,
or a pool of worker processes (:func:`worker_pool`), within :func:`reuse_sessions`."""
from __future__ import annotations

from contextlib import contextmanager

from . import workers
from .settings import Progress, resolve_engine
from .workers import WorkerPlan, WorkerRequest


class LocalSession:
    """A session created on first use in this process (for work without worker processes);
    inside :func:`reuse_sessions`, the one already loaded for the same model and device."""

    def __init__(self, model: str | None, gpu: bool, threads: int | None, session=None, main_gpu: int | None = None, engine: str | None = None):
        self.model, self.gpu, self.threads, self.main_gpu, self.engine = model, gpu, threads, main_gpu or 0, resolve_engine(engine, gpu)
        self.session = session

    def __call__(self):
        if self.session is None:
            from . import model as model_files
            from .session import Session  # the engines and llama.cpp's tokenizer: imported when a block first needs a model

            if _reused is None:
                self.session = Session(self.model, gpu=self.gpu, threads=self.threads, main_gpu=self.main_gpu, engine=self.engine)
            else:
                info = model_files.locate(self.model)
                key = (info.path, info.sha256, self.gpu, self.threads, self.main_gpu, self.engine)
                if key not in _reused:
                    _close_reused()  # one at a time: each holds a model and its contexts
                    _reused[key] = Session(info.path, gpu=self.gpu, threads=self.threads, main_gpu=self.main_gpu, engine=self.engine)
                self.session = _reused[key]
        return self.session


# in reuse_sessions(): (model file, SHA-256, GPU?, threads, GPU index, engine) -> Session, and
# ("pool", WorkerPlan, model file, SHA-256, engine) -> WorkerPool; one entry at a time
_reused: dict[tuple, object] | None = None


def planned_workers(request: WorkerRequest) -> WorkerPlan:
    """``request.plan()`` (:func:`nacrith.workers.plan_workers`).

    Inside :func:`reuse_sessions`, the plan of the pool kept from an earlier file when that
    file asked the same; else, for ``auto``, the plan once kept pools are stopped: they hold
    the memory (and GPU memory) that ``auto`` counts, and would otherwise shrink the next
    file's plan.
    """
    kept_pools = [kept for kept in (_reused or {}).values() if isinstance(kept, workers.WorkerPool)]
    for pool in kept_pools:
        if pool.request == request:
            return pool.plan
    if kept_pools and workers.parse_workers(request.workers)[0] == "auto":
        _close_reused()
    return request.plan()


@contextmanager
def worker_pool(plan: WorkerPlan, model: str | None, progress: Progress | None, request: WorkerRequest | None = None, engine: str | None = None):
    """A :class:`nacrith.workers.WorkerPool` for ``plan``, shut down at the end of the block;
    inside :func:`reuse_sessions`, the pool already running for the same plan and model
    file, kept for the next file (its processes have their models loaded and contexts
    created). A pool whose file fails is stopped and dropped: blocks of that file may still
    be running in it. ``request``: what :func:`planned_workers` was asked for ``plan``;
    ``engine``: the engine its workers load.
    """
    engine = resolve_engine(engine, plan.devices[0] is not None)
    if _reused is None:
        with workers.WorkerPool(plan, model, progress, engine=engine) as pool:
            yield pool
        return
    from . import model as model_files

    info = model_files.locate(model)
    key = ("pool", plan, info.path, info.sha256, engine)
    if key not in _reused:
        _close_reused()  # one at a time: each holds models and their contexts
        _reused[key] = workers.WorkerPool(plan, info.path, progress, reusable=True, engine=engine)
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
