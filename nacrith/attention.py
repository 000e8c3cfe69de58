"""Attention modes: how the llama.cpp engine runs attention, recorded in a file's header.

The modes and their thread-count behaviour are described in :mod:`nacrith.engine`; this
module holds their names and the default, with no llama.cpp import, so that settings and
validation need none. The exact engine has one attention of its own and ignores the mode.
"""
from __future__ import annotations

ATTENTION_MODES = ("auto", "off", "on", "stable")  # the header's attention byte: 0, 1, 2, 3


def default_attention(backend: str) -> str:
    """The attention mode new files use on ``backend``.

    "off" on the CPU: logits independent of the thread count, and the fastest mode once
    windows are long (see the module docstring).
    "auto" (llama.cpp's choice) on CUDA, where threads do not matter and files must be
    decoded on the same kind of GPU anyway.
    """
    return "off" if backend == "cpu" else "auto"
