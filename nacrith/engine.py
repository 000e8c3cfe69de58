"""The llama.cpp engine: a loaded model and lockstep contexts on its low-level API.

A :class:`LockstepContext` holds up to ``n_streams`` independent sequences (one sequence
id per stream). Each :meth:`LockstepContext.step` feeds exactly one token of each of the
first ``n`` streams to a single ``llama_decode`` and returns the logits of the streams that
asked for them. Decompression must make the identical sequence of calls: llama.cpp's logits
are reproducible only for the same calls (feeding several tokens of one sequence at once,
prompt-style, gives different numbers; on CUDA a stream's logits also depend on its batch
companions).

Attention and thread counts: llama.cpp's CPU flash-attention kernel has a "split-KV" path,
taken when a decode call holds a single sequence whose KV view has 512 cells or more (more
than 256 tokens; the view is padded to 256). It cuts the KV cache into one chunk per thread
and merges the partial sums, so its logits depend on the thread count (measured: 1 and 2
threads differ by up to 1.9 in a logit once a lone stream passes 256 tokens). With two or
more sequences in the call every thread computes whole rows, and logits are bit-identical
for any thread count. Attention without flash is thread-independent at any length.

The CPU default is "off", attention without flash: thread-independent, and faster than flash
attention once windows are long (16 streams, the default model, `bench/tradeoff.py`, one run
each: 711 s against 777 s on lcet10.txt at 1024 tokens, 318 s against 354 s on alice29.txt,
234 s against 242 s on alice29.txt at 512 tokens). Flash attention is faster only while
windows are short (a probe outside bench/: 254 against 235 tokens/s over the first 200 steps),
and on whole small files the two took the same time (bench/experiments/FINDINGS.md, "Attention mode").

The "stable" mode, the CPU default of earlier files, keeps flash attention
thread-independent: contexts of two or more streams run flash attention and add a companion
sequence (one BOS token at position 0, logits not read) to any call that would hold a single
token, which happens only in the last step of a block whose streams differ in length.
llama.cpp keeps sequences in one micro-batch only when their ids are consecutive, so the
companion is sequence 0 and stream i is sequence i + 1. A context of 256 streams
(llama.cpp's limit on sequences) has no room for sequence 0: its streams are sequences 0-255
and the companion is sequence 1, whose stream has finished by the time stream 0 runs alone.
One-stream contexts run without flash attention: as fast as with it for a single stream (121
tokens/s) and much faster than with a companion in every call (82). The mode a file was made
with is in its header.

When a stream reaches the end of its window, :meth:`LockstepContext.slide` drops tokens from
the KV cache and shifts the rest back (``llama_memory_seq_rm`` + ``llama_memory_seq_add``),
so kept tokens are never evaluated again.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import EngineError, ModelNotFoundError

from .attention import ATTENTION_MODES, default_attention  # noqa: F401  (re-exported)
from .llama import L, _compiled_features, _init_backend, _setup, cpu_build, llama_cpp_version  # noqa: F401  (re-exported)
from .settings import default_threads


def gpu_available() -> bool:
    """True when this llama.cpp build can offload layers and sees at least one GPU."""
    _init_backend()
    if not L.llama_supports_gpu_offload():
        return False
    from .devices import gpus

    return bool(gpus())


def gpu_missing() -> str:
    """Why :func:`gpu_available` is false, as a clause for an error message."""
    _init_backend()
    if not L.llama_supports_gpu_offload():
        return "this llama.cpp has no GPU support (see `make install-cuda`)"
    return "this llama.cpp has GPU support but sees no GPU (CUDA_VISIBLE_DEVICES, driver?)"


class _ClosedWhenCollected:
    """Frees its llama.cpp objects with ``close()`` when collected, if nobody did before."""

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


class LlamaModel(_ClosedWhenCollected):
    """A GGUF model loaded through llama.cpp.

    ``gpu=True`` offloads every layer to the GPU numbered ``main_gpu`` (no layer splitting
    across GPUs); it needs a llama.cpp build with GPU support. ``vocab_only`` loads the
    vocabulary alone (for the tokenizer of another engine): no weights, no contexts.
    """

    def __init__(self, path: str | os.PathLike, gpu: bool = False, main_gpu: int = 0, vocab_only: bool = False):
        _init_backend()
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path}")
        if gpu and not L.llama_supports_gpu_offload():
            raise EngineError("this llama.cpp build has no GPU support (see `make install-cuda`)")
        params = L.llama_model_default_params()
        params.n_gpu_layers = -1 if gpu else 0
        params.vocab_only = vocab_only
        if gpu:
            params.split_mode = 0  # LLAMA_SPLIT_MODE_NONE: the whole model on main_gpu
            params.main_gpu = main_gpu
        with _setup:
            handle = L.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise EngineError(f"llama.cpp could not load the model {path}")
        self.handle = handle
        self.path = path
        self.vocab = L.llama_model_get_vocab(handle)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(handle))
        self.gpu = gpu
        self.backend = "cuda" if gpu else "cpu"
        self.bos = self._start_token()

    def _start_token(self) -> int:
        """The token every stream starts from: BOS, else EOS, else token 0."""
        for token in (L.llama_vocab_bos(self.vocab), L.llama_vocab_eos(self.vocab)):
            if 0 <= token < self.n_vocab:
                return int(token)
        return 0

    def close(self) -> None:
        if self.handle:
            L.llama_model_free(self.handle)
            self.handle = None


_FLASH_ATTN_TYPE = {"auto": -1, "off": 0, "on": 1}  # llama.cpp's llama_flash_attn_type
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences per context


def attention_setup(attention: str, n_streams: int) -> tuple[int, bool]:
    """(llama.cpp flash_attn_type, whether single-token calls get a companion) for a context."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {attention!r}")
    if attention != "stable":
        return _FLASH_ATTN_TYPE[attention], False
    if n_streams == 1:
        return _FLASH_ATTN_TYPE["off"], False
    return _FLASH_ATTN_TYPE["on"], True


class LockstepContext(_ClosedWhenCollected):
    """A llama.cpp context running up to ``n_streams`` sequences of at most ``ctx`` tokens.

    Each sequence has its own KV cells (``kv_unified`` off), ``ctx`` of them. ``attention``
    is one of :data:`ATTENTION_MODES`: flash attention "off", "on", llama.cpp's "auto", or
    "stable" (thread-independent logits; see the module docstring).
    """

    def __init__(self, model: LlamaModel, n_streams: int, ctx: int, threads: int | None = None, attention: str | None = None):
        attention = attention or default_attention(model.backend)
        flash, paired = attention_setup(attention, n_streams)
        if n_streams < 1:
            raise ValueError("n_streams must be at least 1")
        if ctx < 8 or ctx > model.n_ctx_train:
            raise ValueError(f"context length must be between 8 and {model.n_ctx_train}, got {ctx}")
        self.model = model
        self.n_streams = n_streams
        self.ctx = ctx
        self.attention = attention
        self.paired = paired
        # stream i is sequence first_seq + i; the companion is sequence 0 when there is room
        # for it, else (256 streams) the finished stream 1's sequence
        self.companion_seq = 0 if n_streams < MAX_SEQUENCES else 1
        self.first_seq = 1 if paired and self.companion_seq == 0 else 0
        n_sequences = n_streams + self.first_seq
        threads = threads or default_threads()
        params = L.llama_context_default_params()
        params.n_ctx = ctx * n_sequences
        params.n_batch = max(n_sequences, 32)
        params.n_ubatch = max(n_sequences, 32)
        params.n_seq_max = n_sequences
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False
        params.no_perf = True
        params.flash_attn_type = flash
        with _setup:
            self.handle = L.llama_init_from_model(model.handle, params)
        if not self.handle:
            raise EngineError(f"llama.cpp could not create a context for {n_streams} streams of {ctx} tokens")
        self.memory = L.llama_get_memory(self.handle)
        self.batch = L.llama_batch_init(params.n_batch, 0, 1)
        capacity = params.n_batch
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(capacity,))
        self._positions = np.ctypeslib.as_array(self.batch.pos, shape=(capacity,))
        self._want = np.ctypeslib.as_array(self.batch.logits, shape=(capacity,))
        for slot in range(capacity):  # slot i carries stream i
            self.batch.n_seq_id[slot] = 1
            self.batch.seq_id[slot][0] = self.first_seq + slot

    def reset(self) -> None:
        """Forget every sequence (clear the KV cache)."""
        L.llama_memory_clear(self.memory, True)

    def step(self, tokens: np.ndarray, positions: np.ndarray, want_logits: np.ndarray | None = None) -> np.ndarray:
        """Feed ``tokens[i]`` at ``positions[i]`` to stream ``i`` for the first ``len(tokens)`` streams.

        Returns a read-only float32 view ``(n_out, n_vocab)`` of the logits of the streams
        with ``want_logits`` true (all of them when None), in stream order. The view is
        valid until the next call.
        """
        n = len(tokens)
        if n > self.n_streams:
            raise ValueError("more tokens than streams")
        self._tokens[:n] = tokens
        self._positions[:n] = positions
        if want_logits is None:
            self._want[:n] = 1
            n_out = n
        else:
            self._want[:n] = want_logits
            n_out = int(np.count_nonzero(want_logits))
        if n == 1 and self.paired:
            status = self._decode_with_companion()
        else:
            self.batch.n_tokens = n
            status = L.llama_decode(self.handle, self.batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        if n_out == 0:
            return np.empty((0, self.model.n_vocab), np.float32)
        view = np.ctypeslib.as_array(L.llama_get_logits(self.handle), shape=(n_out, self.model.n_vocab))
        view.flags.writeable = False
        return view

    def _decode_with_companion(self) -> int:
        """Decode stream 0's token beside a fresh BOS on the companion sequence.

        Two sequences (consecutive ids, in increasing order) keep llama.cpp off its
        thread-dependent split-KV attention path; the companion is emptied first, so its
        token always sits alone at position 0.
        """
        L.llama_memory_seq_rm(self.memory, self.companion_seq, -1, -1)
        if self.companion_seq == 1:  # 256 streams: slot 1 already carries sequence 1
            self._tokens[1], self._positions[1], self._want[1] = self.model.bos, 0, 0
            self.batch.n_tokens = 2
            return L.llama_decode(self.handle, self.batch)
        self._tokens[1], self._positions[1], self._want[1] = self._tokens[0], self._positions[0], self._want[0]
        self._tokens[0], self._positions[0], self._want[0] = self.model.bos, 0, 0
        self.batch.seq_id[0][0], self.batch.seq_id[1][0] = 0, 1
        self.batch.n_tokens = 2
        try:
            return L.llama_decode(self.handle, self.batch)
        finally:
            self.batch.seq_id[0][0], self.batch.seq_id[1][0] = 1, 2  # slot i carries stream i again

    def slide(self, stream: int, keep: int, drop: int) -> None:
        """Drop positions ``[keep, keep + drop)`` of ``stream`` and move later ones back by ``drop``."""
        sequence = self.first_seq + stream
        if not L.llama_memory_seq_rm(self.memory, sequence, keep, keep + drop):
            raise EngineError("llama.cpp could not remove tokens from the KV cache")
        L.llama_memory_seq_add(self.memory, sequence, keep + drop, -1, -drop)

    def close(self) -> None:
        if self.handle:
            L.llama_batch_free(self.batch)
            L.llama_free(self.handle)
            self.handle = None
