"""A loaded model with its tokenizer and reusable lockstep contexts.

Loading the model and building the piece table take a fraction of a second; creating a
context allocates its KV cache. A :class:`Session` does each once per process and hands
out a context per (streams, window) shape, so consecutive blocks reuse it.

A session runs one of two engines (:data:`ENGINES`): ``llama.cpp`` (:mod:`nacrith.engine`)
or ``exact`` (:mod:`nacrith.exact`, integer arithmetic whose files decode on any machine).
The tokenizer is llama.cpp's either way (the exact engine loads the vocabulary alone).
"""
from __future__ import annotations

from collections import OrderedDict

from . import model as model_files
from .attention import default_attention
from .engine import LlamaModel, LockstepContext
from .compat import engine_name, engine_of  # noqa: F401  (re-exported)
from .settings import DEFAULT_ENGINE, ENGINES, resolve_engine  # noqa: F401  (re-exported)
from .tokenizer import Tokenizer

MAX_CACHED_CONTEXTS = 2  # the usual block shape and the smaller last block


class Session:
    """Model, tokenizer and contexts for one process, one engine and one backend
    (``engine`` None: :data:`DEFAULT_ENGINE`, or llama.cpp with ``gpu``)."""

    def __init__(self, model_path=None, gpu: bool = False, threads: int | None = None, main_gpu: int = 0, engine: str | None = None):
        engine = resolve_engine(engine, gpu)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        self.info = model_files.locate(model_path)
        self.engine = engine
        if engine == "exact":
            from .exact.engine import ExactModel

            self.llama = ExactModel(self.info.path, self.info.sha256, threads, device=f"cuda:{main_gpu}" if gpu else "cpu")
            self._vocab = LlamaModel(self.info.path, vocab_only=True)
            self.tokenizer = Tokenizer(self._vocab)
        else:
            self.llama = LlamaModel(self.info.path, gpu=gpu, main_gpu=main_gpu)
            self._vocab = None
            self.tokenizer = Tokenizer(self.llama)
        self.threads = threads
        self._contexts: OrderedDict[tuple[int, int, str], LockstepContext] = OrderedDict()

    @property
    def backend(self) -> str:
        """"cpu" or "cuda" for llama.cpp; "any" for the exact engine, whose files decode anywhere."""
        return "any" if self.engine == "exact" else self.llama.backend

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
        if self.engine == "exact":
            context = self.llama.context(n_streams, ctx, self.threads)
        else:
            context = LockstepContext(self.llama, n_streams, ctx, self.threads, attention)
        self._contexts[key] = context
        return context

    def close(self) -> None:
        for context in self._contexts.values():
            context.close()
        self._contexts.clear()
        self.llama.close()
        if self._vocab is not None:
            self._vocab.close()
