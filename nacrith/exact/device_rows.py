"""The int24 coder's distribution computed where the exact engine's logits are (a GPU).

The model-only predictor turns a row of logits into the int24 coder's integer weights
(:mod:`nacrith.predictors.llm`, :mod:`nacrith.coder`). For the exact engine's integer
logits ``L`` (at 2^-14) every step of that is integer arithmetic or one correctly rounded
IEEE operation, so PyTorch computes the same integers on any device:

1. ``x = float32(L) * 2^-14`` and ``d = (max(x) - x) * float32(64 / ln 2)``, each operation
   in float32 (one tensor operation each: nothing fuses them into an FMA);
2. ``j = min(trunc(d), 1000 * 64)``, ``a = j >> 6``, ``b = j & 63``;
3. ``w = ((128 - b) << 23) >> min(a, 31)``: ``trunc(2^30 * 2^(-j/64))`` for Schraudolph's
   ``2^(-j/64)`` (:mod:`nacrith.predictors.llm`), as the C kernel's ``exp2_weight_rows``;
4. ``S = sum(w)``, ``scale = float64(2^24 - n) / float64(S)`` (one IEEE division of two
   tensors), ``left(s) = trunc(float64(C_s) * scale) + s`` with ``C_s = w_0 + ... + w_(s-1)``
   (an exact integer below 2^53), ``left(n) = 2^24``.

Only what the range coder needs crosses to the host: compressing, each stream's interval
``[left(s), left(s + 1))`` of its token (two int64 per stream; the host codes them with
:func:`nacrith.coder.encode_intervals_into`); decompressing on a GPU, the coder's state and
words go to the device, where :mod:`nacrith.exact.triton_decode` finds each stream's
symbol in turn, and the symbols come back. On the CPU (``NACRITH_EXACT_IMPL=torch``) the
weights go to the C coder as :class:`~nacrith.coder.WeightRows`: the same integers, so the
same bytes, as every other implementation (tests/test_device_rows.py).
"""
from __future__ import annotations

import numpy as np

from ..coder import TOTAL, CodedRows, WeightRows, decode_rows_into, encode_intervals_into
from ..predictors.llm import _SCALE, LIMIT, STEPS_PER_BIT
from .reference import F

WEIGHT_SHIFT = 23  # w = (128 - b) << 23 >> a: 2^30 at the row's maximum (j = 0)


def weights(torch, logits):
    """(int64 weights ``w`` [rows, n], int64 totals ``S`` [rows]) of integer logits at 2^-14
    (int64 [rows, n], on any device): the integers ``exp2_weight_rows`` gives for
    ``float32(logits) * 2^-14``."""
    x = logits.to(torch.float32) * (2.0 ** -F)  # a power of two: exact
    best = x.max(dim=1, keepdim=True).values  # max is exact in any order
    distance = torch.sub(best, x)
    distance = torch.mul(distance, float(_SCALE))  # a float32 tensor times a float32-exact scalar: float32
    level = torch.clamp(distance, max=float(LIMIT)).to(torch.int64)  # trunc; d >= 0
    shift = torch.clamp(level // STEPS_PER_BIT, max=31)
    w = ((128 - level % STEPS_PER_BIT) << WEIGHT_SHIFT) >> shift
    return w, w.sum(dim=1)


def scales(torch, totals, n: int):
    """``float64(2^24 - n) / float64(S)`` per row, as the coder computes it."""
    return torch.full_like(totals, TOTAL - n, dtype=torch.float64) / totals.to(torch.float64)


def intervals(torch, w, totals, symbols):
    """(lefts, rights), int64 per row: the interval of ``symbols[r]`` (int64 tensor) in row ``r``'s quantisation."""
    n = w.shape[1]
    scale = scales(torch, totals, n)
    columns = torch.arange(n, device=w.device)
    symbols = symbols.to(torch.int64)
    before = torch.where(columns.unsqueeze(0) < symbols.unsqueeze(1), w, torch.zeros_like(w)).sum(dim=1)
    own = w.gather(1, symbols.unsqueeze(1)).squeeze(1)
    lefts = (before.to(torch.float64) * scale).to(torch.int64) + symbols
    rights = ((before + own).to(torch.float64) * scale).to(torch.int64) + symbols + 1
    rights = torch.where(symbols == n - 1, torch.full_like(rights, TOTAL), rights)
    return lefts, rights


def prefix_sums(torch, w):
    """``C_0..C_n`` of every row (int64 [rows, n + 1]): exact prefix sums of the weights."""
    prefix = torch.zeros((w.shape[0], w.shape[1] + 1), dtype=torch.int64, device=w.device)
    prefix[:, 1:] = torch.cumsum(w, dim=1)
    return prefix


def lefts_table(torch, w, totals):
    """``left(0..n)`` of every row (int64 [rows, n + 1]): the quantisation as a table (tests)."""
    n = w.shape[1]
    lefts = (prefix_sums(torch, w).to(torch.float64) * scales(torch, totals, n).unsqueeze(1)).to(torch.int64) + torch.arange(n + 1, device=w.device)
    lefts[:, n] = TOTAL
    return lefts


class DeviceRows(CodedRows):
    """A step's integer weight rows ``w`` (int64 [rows, n], each row's prefix sums below
    2^53) and totals on a PyTorch device; the int24 coder hands them its state
    (:class:`~nacrith.coder.CodedRows`) and only intervals or symbols cross to the host.
    The same integers and bytes as :class:`~nacrith.coder.WeightRows` of them."""

    def __init__(self, torch, w=None, totals=None):
        self.torch = torch
        self._w, self._totals = w, totals

    def __len__(self) -> int:
        return len(self._weights()[1])

    def _weights(self):
        return self._w, self._totals

    def int24_encode(self, symbols: np.ndarray, state: np.ndarray, out: np.ndarray) -> int:
        torch = self.torch
        w, totals = self._weights()
        n = w.shape[1]
        symbols = np.asarray(symbols, np.int64)
        if len(symbols) and not (0 <= symbols.min() and symbols.max() < n):
            raise ValueError("symbol out of range")
        lefts, rights = intervals(torch, w, totals, torch.as_tensor(symbols, device=w.device))
        both = torch.stack((lefts, rights)).cpu().numpy()
        return encode_intervals_into(np.ascontiguousarray(both[0]), np.ascontiguousarray(both[1]), state, out)

    def int24_decode(self, state: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
        w, totals = self._weights()
        from . import triton_decode

        # on a GPU the Triton kernel; on the CPU the C coder, or the kernel in Triton's interpreter (tests)
        if triton_decode.available() and (w.device.type == "cuda" or triton_decode.interpreted()):
            return triton_decode.decode(self.torch, prefix_sums(self.torch, w), scales(self.torch, totals, w.shape[1]), state, words, out)
        rows = WeightRows(w.cpu().numpy().astype(np.uint32), totals.cpu().numpy().astype(np.uint64))
        return decode_rows_into(rows, state, words, out)


class DeviceLogits(DeviceRows):
    """A step's rows as integer logits on the exact engine's device: :class:`DeviceRows` of
    their int24 weights (:func:`weights`), computed when first coded."""

    def __init__(self, torch, logits):
        super().__init__(torch)
        self.logits = logits

    def __len__(self) -> int:
        return len(self.logits)

    def _weights(self):
        if self._w is None:
            self._w, self._totals = weights(self.torch, self.logits)
        return self._w, self._totals
