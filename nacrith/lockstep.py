"""Lockstep coding of a block's streams: one ``llama_decode`` per step for all of them.

A block's tokens are cut into ``n`` contiguous streams whose lengths differ by at most
one, longest first, so the streams still running at any step are always the first ones.
At step ``k`` every running stream feeds its previous token (BOS at step 0) at its next
position and gets the distribution of its ``k``-th token. The encoder codes the known
tokens; the decoder decodes them from the same distributions. Both make exactly the same
engine calls, which is what makes llama.cpp's logits reproducible.

When the streams' next position reaches ``ctx``, every running stream drops ``slide``
tokens after the first (the BOS, kept as the attention anchor) and continues at
``ctx - slide`` with its KV cache shifted, never re-evaluated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from .coder import DEFAULT_CODER, make_decoder, make_encoder

if TYPE_CHECKING:
    from .engine import LockstepContext

KEEP = 1  # tokens kept at the start of a window when it slides: the BOS


def split_streams(n_tokens: int, n_streams: int) -> list[int]:
    """Stream lengths for ``n_tokens`` tokens: ``n_streams`` contiguous parts, longest first."""
    n_streams = max(1, min(n_streams, n_tokens))
    base, extra = divmod(n_tokens, n_streams)
    return [base + 1] * extra + [base] * (n_streams - extra) if n_tokens else []


def check_window(ctx: int, slide: int) -> None:
    """Reject window settings that could not slide."""
    if not 1 <= slide <= ctx - KEEP - 1:
        raise ValueError(f"slide must be between 1 and ctx - {KEEP + 1} (ctx {ctx}, slide {slide})")


class Lockstep:
    """Drives one context through the steps of one block.

    ``predictor`` supplies ``want_logits(n)`` (which running streams need the model this
    step, None for all), ``probabilities(logits, n)`` (float64 rows for the first ``n``
    streams, or, after ``use_int24_rows(True)`` where the predictor has it, rows in a form
    only the int24 coder takes: :class:`~nacrith.coder.WeightRows` or
    :class:`~nacrith.coder.CodedRows`) and ``update(symbols)``.
    """

    def __init__(self, context: LockstepContext, bos: int, ctx: int, slide: int, predictor, progress: Callable | None = None, coder: str = DEFAULT_CODER):
        check_window(ctx, slide)
        self.coder = coder  # the range coder's name (nacrith.coder.CODERS)
        if hasattr(predictor, "use_int24_rows"):  # a predictor with a faster way to the int24 coder
            predictor.use_int24_rows(coder == "int24")
        if hasattr(context, "device_logits"):  # the exact engine's PyTorch logits coded where they are
            context.device_logits = coder == "int24" and getattr(predictor, "takes_device_logits", False)
        self.context = context
        self.bos = bos
        self.ctx = ctx
        self.slide = slide
        self.predictor = predictor
        self.progress = progress

    def _steps(self, lengths: list[int]):
        """Yield (step, n_running, probabilities) and feed back the symbols sent in."""
        n_streams = len(lengths)
        previous = np.full(n_streams, self.bos, np.int32)
        position = 0
        self.context.reset()
        running = n_streams
        for step in range(lengths[0] if lengths else 0):
            while running and lengths[running - 1] <= step:
                running -= 1
            if position == self.ctx:
                for stream in range(running):
                    self.context.slide(stream, KEEP, self.slide)
                position -= self.slide
            want = self.predictor.want_logits(running)
            logits = self.context.step(previous[:running], np.full(running, position, np.int32), want)
            probabilities = self.predictor.probabilities(logits, running)
            symbols = yield step, running, probabilities
            self.predictor.update(symbols)
            previous[:running] = symbols
            position += 1
            if self.progress:
                self.progress(running)

    def encode(self, streams: list[np.ndarray]) -> bytes:
        """Code the token arrays ``streams`` (lengths as :func:`split_streams` gives)."""
        lengths = [len(s) for s in streams]
        table = np.zeros((len(streams), lengths[0] if lengths else 0), np.int32)
        for row, tokens in enumerate(streams):
            table[row, : len(tokens)] = tokens
        encoder = make_encoder(self.coder)
        steps = self._steps(lengths)
        try:
            step, running, probabilities = next(steps)
            while True:
                symbols = table[:running, step]
                encoder.encode(symbols, probabilities)
                step, running, probabilities = steps.send(symbols)
        except StopIteration:
            pass
        return encoder.finish()

    def decode(self, coded: bytes, lengths: list[int]) -> list[np.ndarray]:
        """Recover the token arrays of streams of the given lengths from ``coded``."""
        decoder = make_decoder(coded, self.coder)
        table = np.zeros((len(lengths), lengths[0] if lengths else 0), np.int32)
        steps = self._steps(lengths)
        try:
            step, running, probabilities = next(steps)
            while True:
                symbols = decoder.decode(probabilities)
                table[:running, step] = symbols
                step, running, probabilities = steps.send(symbols)
        except StopIteration:
            pass
        return [table[row, :length] for row, length in enumerate(lengths)]
