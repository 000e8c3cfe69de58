"""The compute devices llama.cpp sees, with free memory, read through ggml's backend API.

This needs no ``nvidia-smi``: ggml's device registry (``ggml_backend_dev_*`` in the
libraries llama-cpp-python ships) lists every GPU of the build's backends and reports its
free and total memory.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from .llama import L, _init_backend

GPU_TYPES = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


@dataclass(frozen=True)
class Device:
    index: int  # position among the GPUs, as llama.cpp's main_gpu counts them
    name: str
    description: str
    free_bytes: int
    total_bytes: int


def _library(name: str):
    folder = Path(L.__file__).resolve().parent / "lib"
    for candidate in sorted(folder.glob(f"{name}.so*")) + sorted(folder.glob(f"{name}.dylib")):
        try:
            return ctypes.CDLL(str(candidate))
        except OSError:
            continue
    return None


def gpus() -> list[Device]:
    """The GPUs llama.cpp can use (empty for a CPU-only build)."""
    _init_backend()
    ggml, base = _library("libggml"), _library("libggml-base")
    if ggml is None or base is None:
        return []
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_name.restype = ctypes.c_char_p
    base.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_description.restype = ctypes.c_char_p
    base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    found = []
    for number in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(number)
        if base.ggml_backend_dev_type(device) not in GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        found.append(Device(len(found), base.ggml_backend_dev_name(device).decode(), base.ggml_backend_dev_description(device).decode(), free.value, total.value))
    return found
