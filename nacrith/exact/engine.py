"""The exact engine behind nacrith's engine interface: :class:`ExactModel` and its contexts.

An :class:`ExactModel` plays the part of :class:`nacrith.engine.LlamaModel` (``n_vocab``,
``bos``, ``n_ctx_train``, ``backend``) and makes :class:`ExactContext` objects that
behave as :class:`nacrith.engine.LockstepContext` does (``reset``, ``step``, ``slide``):
the lockstep coder, the predictors and the container do not know which engine runs.
Logits come out as float32 rows equal to the engine's integers times 2^-14, exactly.

Which implementation computes the integers (all give the same ones):

* ``simd``: the C kernel's fastest path on this CPU (AVX-512 VNNI, else AVX2, else scalar);
* ``scalar``: the C kernel's plain C path;
* ``avx2`` / ``vnni``: one SIMD path of the C kernel, where the CPU has it;
* ``reference``: the numpy reference (:mod:`nacrith.exact.reference`), slow;
* ``torch``: the PyTorch implementation (:mod:`nacrith.exact.torch_engine`) on the CPU,
  where PyTorch is installed (``pip install 'nacrith[gpu]'``); on a GPU (``device``
  ``cuda:N``, what ``--gpus`` gives) it is the one that runs.

``NACRITH_EXACT_IMPL`` chooses one; by default ``simd``, or ``reference`` where the C
kernel was not built. On a GPU, ``NACRITH_EXACT_TRITON=1`` fuses the step's integer
primitives into Triton kernels (:mod:`nacrith.exact.triton_step`) and
``NACRITH_EXACT_GRAPH=1`` replays steps of every stream from a CUDA graph over the whole
window; both give the same integers and are off until measured.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import EngineError, ModelFileError
from ..gguf import GGUFFormatError
from . import kernel
from .reference import F, SPEC_VERSION, ReferenceContext
from .weights import load_cached

IMPLEMENTATIONS = ("simd", "scalar", "avx2", "vnni", "reference", "torch")
ENGINE_PREFIX = "exact (spec "


def engine_name(spec: int = SPEC_VERSION) -> str:
    """The engine string containers record for files of this engine: ``exact (spec 1)``."""
    return f"{ENGINE_PREFIX}{spec})"


def spec_of(engine: str) -> int | None:
    """The spec version an engine string names, None if it is not the exact engine's."""
    if not engine.startswith(ENGINE_PREFIX) or not engine.endswith(")"):
        return None
    number = engine[len(ENGINE_PREFIX):-1]
    return int(number) if number.isdigit() else None


def chosen_implementation(name: str | None = None) -> str:
    """``name``, else ``$NACRITH_EXACT_IMPL``, else ``simd`` (``reference`` without the C
    kernel); an unknown name, or a C path this build or CPU lacks, is an :class:`EngineError`."""
    name = name or os.environ.get("NACRITH_EXACT_IMPL") or ("simd" if kernel.available() else "reference")
    if name not in IMPLEMENTATIONS:
        raise EngineError(f"NACRITH_EXACT_IMPL must be one of {', '.join(IMPLEMENTATIONS)}, not {name!r}")
    if name == "torch":
        from .torch_engine import require_torch

        require_torch()
        return name
    if name != "reference" and not kernel.available():
        raise EngineError(f"the exact engine's C kernel is not built, so {name!r} cannot run (NACRITH_EXACT_IMPL=reference can)")
    wanted = {"avx2": 1, "vnni": 2}.get(name)
    if wanted is not None and kernel.best_simd() < wanted:
        raise EngineError(f"this CPU lacks the {name} path of the exact engine")
    return name


def simd_level(implementation: str) -> int | None:
    """The C kernel's path number for an implementation name (None: the numpy reference)."""
    return {"simd": kernel.best_simd(), "scalar": 0, "avx2": 1, "vnni": 2}.get(implementation)


class ExactModel:
    """A Llama-architecture GGUF model loaded for the exact engine (weights converted once
    into nacrith's cache, see :func:`nacrith.exact.weights.load_cached`)."""

    def __init__(self, path, sha256: bytes, threads: int | None = None, implementation: str | None = None, device: str = "cpu"):
        if device != "cpu":  # a GPU: the PyTorch implementation, whatever NACRITH_EXACT_IMPL says
            from .torch_engine import cuda_devices

            index, seen = int(device.partition(":")[2] or 0), len(cuda_devices())
            if index >= seen:
                raise EngineError(f"no CUDA GPU {index} (PyTorch sees {seen})")
            implementation = "torch"
        self.implementation = chosen_implementation(implementation)
        self.backend = "cpu" if device == "cpu" else "cuda"
        try:
            self.weights = load_cached(path, sha256)
        except GGUFFormatError as exc:
            raise ModelFileError(f"model file {path}: {exc}") from None
        hyper = self.weights.hyper
        self.path = path
        self.n_vocab = hyper.n_vocab
        self.n_ctx_train = hyper.n_ctx_train
        self.bos = hyper.bos
        self.threads = threads
        level = simd_level(self.implementation)
        self.kernel = None if level is None else kernel.KernelModel(self.weights)
        self.simd = level
        self.torch = None
        if self.implementation == "torch":
            from .torch_engine import TorchModel

            self.torch = TorchModel(self.weights, device)

    @property
    def description(self) -> str:
        """The implementation as run: ``reference``, ``torch (cpu)``, or the C path's name."""
        if self.torch is not None:
            return f"torch ({self.torch.device})"
        return "reference" if self.simd is None else f"C {kernel.SIMD_NAMES[self.simd]}"

    def context(self, n_streams: int, ctx: int, threads: int | None = None) -> "ExactContext":
        """A new :class:`ExactContext` of ``n_streams`` streams of ``ctx`` tokens."""
        return ExactContext(self, n_streams, ctx, threads or self.threads)

    def close(self) -> None:
        """Drop the kernel's copy of the weights (contexts made from it must be closed first)."""
        self.kernel = None


class ExactContext:
    """Lockstep streams on the exact engine, as :class:`nacrith.engine.LockstepContext`."""

    def __init__(self, model: ExactModel, n_streams: int, ctx: int, threads: int | None = None):
        if n_streams < 1:
            raise ValueError("n_streams must be at least 1")
        if ctx < 8 or ctx > model.n_ctx_train:
            raise ValueError(f"context length must be between 8 and {model.n_ctx_train}, got {ctx}")
        self.model, self.n_streams, self.ctx = model, n_streams, ctx
        from ..settings import default_threads

        threads = threads or default_threads()
        if model.torch is not None:
            from .torch_engine import TorchContext

            self.impl = TorchContext(model.torch, n_streams, ctx)
        elif model.kernel is None:
            self.impl = ReferenceContext(model.weights, n_streams, ctx)
        else:
            self.impl = kernel.KernelContext(model.kernel, n_streams, ctx, threads, model.simd)
        self.lengths = np.zeros(n_streams, np.int64)
        self._scale = np.float32(2.0 ** -F)
        # set by the lockstep coder when its predictor codes the model's rows as they are
        # (the model alone, int24 coder): step() then leaves the PyTorch implementation's
        # logits on its device (nacrith.exact.device_rows)
        self.device_logits = False

    def reset(self) -> None:
        """Forget every stream's tokens."""
        self.impl.reset()
        self.lengths[:] = 0

    def step(self, tokens: np.ndarray, positions: np.ndarray, want_logits: np.ndarray | None = None) -> np.ndarray:
        """Feed ``tokens[i]`` at ``positions[i]`` to stream ``i``; float32 logits of the streams
        with ``want_logits`` true (all when None), in stream order: the engine's integers
        converted to float32 (exact below 2^24, correctly rounded above: the same on every
        machine) times 2^-14. With :attr:`device_logits` and the PyTorch implementation, a
        :class:`~nacrith.exact.device_rows.DeviceLogits` of the integers instead, left on
        the device, which the int24 coder codes there."""
        n = len(tokens)
        on_torch = self.model.torch is not None
        # every stream on a GPU: replayed from a CUDA graph over the whole window (the same integers)
        graph = on_torch and self.model.backend == "cuda" and want_logits is None and n == self.n_streams \
            and os.environ.get("NACRITH_EXACT_GRAPH") == "1"
        if graph or (on_torch and self.device_logits):
            logits = self.impl.step_graph(tokens, positions) if graph else self.impl.step_tensor(tokens, positions, want_logits)
        else:
            logits = self.impl.step(tokens, positions, want_logits)
        self.lengths[:n] = np.maximum(self.lengths[:n], np.asarray(positions, np.int64) + 1)
        if logits is None:  # (step_tensor) no stream wanted logits
            return np.empty((0, self.model.n_vocab), np.float32)
        if on_torch and self.device_logits:
            from .device_rows import DeviceLogits

            return DeviceLogits(self.model.torch.torch, logits)
        if not isinstance(logits, np.ndarray):
            logits = logits.cpu().numpy()
        out = logits.astype(np.float32)
        out *= self._scale
        return out

    def slide(self, stream: int, keep: int, drop: int) -> None:
        """Drop ``drop`` cells after the first ``keep`` of ``stream`` and move the rest down."""
        length = int(self.lengths[stream])
        self.impl.slide(stream, keep, drop, length)
        self.lengths[stream] = length - drop

    def close(self) -> None:
        """Free the implementation's KV cache (the C kernel's memory and threads)."""
        close = getattr(self.impl, "close", None)
        if close:
            close()
