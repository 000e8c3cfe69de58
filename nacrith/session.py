"""A loaded model with its tokenizer and reusable lockstep contexts.

Loading the model and building the piece table take a fraction of a second; creating a
context allocates its KV cache. A :class:`Session` does each once per process and hands
out a context per (streams, window) shape, so consecutive blocks reuse it.
"""
from __future__ import annotations

from collections import OrderedDict

from . import model as model_files
from .engine import LlamaModel, LockstepContext, default_attention, llama_cpp_version
from .tokenizer import Tokenizer

MAX_CACHED_CONTEXTS = 2  # the usual block shape and the smaller last block


def engine_name() -> str:
    """The engine string recorded in containers."""
    return f"llama.cpp (llama-cpp-python {llama_cpp_version()})"


class Session:
    """Model, tokenizer and contexts for one process and one backend."""

    def __init__(self, model_path=None, gpu: bool = False, threads: int | None = None, main_gpu: int = 0):
        self.info = model_files.locate(model_path)
        self.llama = LlamaModel(self.info.path, gpu=gpu, main_gpu=main_gpu)
        self.tokenizer = Tokenizer(self.llama)
        self.threads = threads
        self._contexts: OrderedDict[tuple[int, int, str], LockstepContext] = OrderedDict()

    @property
    def backend(self) -> str:
        return self.llama.backend

    def context(self, n_streams: int, ctx: int, attention: str | None = None) -> LockstepContext:
        """A context for exactly ``n_streams`` streams of ``ctx`` tokens (cleared by the caller).

        ``attention``: see :data:`nacrith.engine.ATTENTION_MODES` (None: the backend's default).
        """
        attention = attention or default_attention(self.backend)
        key = (n_streams, ctx, attention)
        if key in self._contexts:
            self._contexts.move_to_end(key)
            return self._contexts[key]
        while len(self._contexts) >= MAX_CACHED_CONTEXTS:
            _, old = self._contexts.popitem(last=False)
            old.close()
        context = LockstepContext(self.llama, n_streams, ctx, self.threads, attention)
        self._contexts[key] = context
        return context

    def close(self) -> None:
        for context in self._contexts.values():
            context.close()
        self._contexts.clear()
        self.llama.close()
