"""llama.cpp itself: importing llama-cpp-python, starting its backend quietly, and what the
build is (its version, the CPU features its arithmetic was compiled for).

Every module that calls llama.cpp takes ``L`` (the ``llama_cpp`` module) from here, so that
importing it is one decision in one place: :mod:`nacrith.engine` (the llama.cpp engine),
:mod:`nacrith.devices` (the GPUs ggml sees) and :mod:`nacrith.tokenizer` (llama.cpp's
tokenizer, which every engine uses). ``import nacrith`` does not import this module.
"""
from __future__ import annotations

import ctypes
import os
import threading

try:  # llama_cpp prints nothing on import; its C library logs through the callback below
    import llama_cpp as L
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("nacrith needs llama-cpp-python (pip install llama-cpp-python)") from exc

_backend_ready = False
# llama.cpp's set-up (backend, model loading, context creation) runs one thread at a time:
# worker lanes start side by side, and the backend's start redirects the process's stderr
_setup = threading.RLock()
_quiet_logger = L.llama_log_callback(lambda level, text, user_data: None)


def _init_backend() -> None:
    """Initialise llama.cpp once, quietly: its device probing writes to stderr directly.

    ``NACRITH_LLAMA_LOG=1`` keeps llama.cpp's own messages.
    """
    global _backend_ready
    with _setup:
        if not _backend_ready:
            _start_backend()
            _backend_ready = True


def _start_backend() -> None:
    if os.environ.get("NACRITH_LLAMA_LOG"):
        L.llama_backend_init()
    else:
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            L.llama_log_set(_quiet_logger, ctypes.c_void_p())
            L.llama_backend_init()
            L.llama_supports_gpu_offload()  # makes the GPU backends probe their devices now
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_version() -> str:
    """The version of the llama-cpp-python package that runs the model."""
    return getattr(L, "__version__", "unknown")


def cpu_build() -> str:
    """This llama.cpp build's CPU arithmetic, as CPU-made files record it: the machine's
    architecture and the features its CPU backend was compiled with, in llama.cpp's order
    (``x86_64 SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 LLAMAFILE OPENMP REPACK`` for ``make
    install``'s portable build).

    Logits depend on them: an AVX2 build and an AVX-512 build of the same llama.cpp differ
    by up to 1.37 in a logit within 40 steps on this model, and each refuses the other's
    files as corrupt only after decoding them (docs/compatibility.md).
    """
    import platform

    return " ".join([platform.machine() or "unknown", *_compiled_features("CPU")])


def _compiled_features(backend: str) -> list[str]:
    """The features ``llama_print_system_info`` reports for ``backend``: the name of each
    that is on (``= 1``), ``NAME=VALUE`` for each other value but 0 (``SVE_CNT = 32``, the
    vector length, which changes the arithmetic as much as a feature does).

    It reads ``CUDA : ARCHS = 900 | ... | CPU : SSE3 = 1 | SSSE3 = 1 | ...``: a segment
    with ``NAME :`` starts a backend's list.
    """
    current, features = None, []
    for segment in L.llama_print_system_info().decode(errors="replace").split("|"):
        name, colon, rest = segment.partition(" : ")
        if colon:
            current, segment = name.strip(), rest
        key, _, value = (part.strip() for part in segment.partition("="))
        if current == backend and key and value not in ("", "0"):
            features.append(key if value == "1" else f"{key}={value}")
    return features
