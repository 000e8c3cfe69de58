"""The int24 range decoder on a GPU (Triton): a step's symbols found where its rows are.

A block's streams share one range coder, coded in stream order, so decoding a step is a
chain: stream ``i``'s quantile depends on the interval of stream ``i - 1``'s symbol. The
host cannot walk that chain over rows that live on the GPU without a round trip per
stream, so the chain runs on the GPU, in one Triton program per call: for each row in turn
it computes the quantile from the decoder's state (the same 64-bit arithmetic as
``decode_symbol`` in ``nacrith/_kernels.c``), finds the symbol ``s`` with
``left(s) <= quantile < left(s + 1)`` in two vector probes (every ``STEP``-th ``left``, then
the ``STEP`` values after the last one not above the quantile; ``left`` is increasing, so
``left(s + 1)`` is the least left above the quantile in either probe, or 2^24),
narrows the state and reads the next coded word where the range fell below 2^32. The
``left`` values are those of :mod:`nacrith.exact.device_rows`: ``trunc(float64(C_s) * scale)
+ s`` from the exact prefix sums, one correctly rounded multiplication each, so the symbols
and the state are the C decoder's (tests/test_device_rows.py runs this kernel in Triton's
interpreter, ``TRITON_INTERPRET=1``, against the C decoder).

Triton is optional (it comes with PyTorch's CUDA builds); where it is missing, rows are
decoded on the host, slower but with the same result.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU build comes without Triton
    triton = tl = None

COARSE = 256  # left values of the first probe (a power of two)
MAX_OFFSET = (1 << 31) - 1

if triton is not None:
    @triton.jit
    def _decode_rows(prefix_ptr, scale_ptr, n, rows, state_ptr, words_ptr, n_words, out_ptr, count_ptr,
                     STEP: tl.constexpr, COARSE: tl.constexpr):
        total = tl.full((), 1 << 24, tl.uint64)
        low_limit = tl.full((), 1 << 32, tl.uint64)
        lower = tl.load(state_ptr).to(tl.uint64, bitcast=True)
        range_ = tl.load(state_ptr + 1).to(tl.uint64, bitcast=True)
        point = tl.load(state_ptr + 2).to(tl.uint64, bitcast=True)
        next_word = tl.load(state_ptr + 3)
        ok = tl.full((), 1, tl.int1)
        count = tl.full((), 0, tl.int64)
        coarse = tl.arange(0, COARSE).to(tl.int64) * STEP
        fine = tl.arange(0, STEP).to(tl.int64)
        for r in range(rows):
            row = prefix_ptr + r * (n + 1)
            scale = tl.load(scale_ptr + r)
            unit = range_ >> 24
            quantile = (point - lower) // unit
            good = ok & (quantile < total)
            q = tl.where(good, quantile, tl.zeros_like(quantile)).to(tl.int64)
            inside = coarse < n
            lefts = (tl.load(row + coarse, mask=inside, other=0).to(tl.float64) * scale).to(tl.int64) + coarse
            below = (lefts <= q) & inside
            start = (tl.sum(below.to(tl.int64)) - 1) * STEP
            # the next probe's left, where one is above the quantile (else left(n) = 2^24)
            right = tl.min(tl.where(inside & ~below, lefts, total.to(tl.int64)), axis=0)
            columns = start + fine
            inside = columns < n
            lefts = (tl.load(row + columns, mask=inside, other=0).to(tl.float64) * scale).to(tl.int64) + columns
            below = (lefts <= q) & inside
            s = start + tl.sum(below.to(tl.int64)) - 1
            left = tl.max(tl.where(below, lefts, -1), axis=0)  # left(s): the largest left not above the quantile
            right = tl.minimum(right, tl.min(tl.where(inside & ~below, lefts, total.to(tl.int64)), axis=0))
            new_lower = lower + unit * left.to(tl.uint64)
            new_range = unit * (right - left).to(tl.uint64)
            renorm = new_range < low_limit
            more = renorm & (next_word < n_words)
            word = tl.load(words_ptr + next_word, mask=more & good, other=0).to(tl.uint64)
            new_point = tl.where(renorm, (point << 32) | word, point)
            new_lower = tl.where(renorm, new_lower << 32, new_lower)
            new_range = tl.where(renorm, new_range << 32, new_range)
            lower = tl.where(good, new_lower, lower)
            range_ = tl.where(good, new_range, range_)
            point = tl.where(good, new_point, point)
            next_word = tl.where(good & more, next_word + 1, next_word)
            tl.store(out_ptr + r, s.to(tl.int32), mask=good)
            count += good.to(tl.int64)
            ok = good
        tl.store(state_ptr, lower.to(tl.int64, bitcast=True))
        tl.store(state_ptr + 1, range_.to(tl.int64, bitcast=True))
        tl.store(state_ptr + 2, point.to(tl.int64, bitcast=True))
        tl.store(state_ptr + 3, next_word)
        tl.store(count_ptr, count)


def available() -> bool:
    """Whether Triton is installed (on a GPU; on the CPU only through its interpreter)."""
    return triton is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_words_cache: list = []  # [(the decoder's words array, its copy on the device)]: one block's words, sent once


def _device_words(torch, words: np.ndarray, device):
    if _words_cache and _words_cache[0][0] is words and _words_cache[0][1].device == device:
        return _words_cache[0][1]
    copy = torch.as_tensor(np.asarray(words, np.int64), device=device)
    _words_cache[:] = [(words, copy)]
    return copy


def step_for(n: int) -> int:
    """The second probe's width: the power of two that lets COARSE probes cover ``n`` columns."""
    step = 1
    while step * COARSE < n:
        step *= 2
    return step


def decode(torch, prefix, scale, state: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
    """Decode one symbol per row of int24 weights, given as their exact prefix sums
    ``prefix`` (int64 [rows, n + 1], :func:`nacrith.exact.device_rows.prefix_sums`, on the
    kernel's device) and each row's ``scale`` (float64, :func:`nacrith.exact.device_rows.scales`),
    from the decoder's ``state`` (uint64[4], updated) and ``words`` (uint32) into ``out``
    (int32); returns the symbols decoded (fewer: invalid data)."""
    rows, n = prefix.shape[0], prefix.shape[1] - 1
    device = prefix.device
    state_t = torch.as_tensor(state.view(np.int64).copy(), device=device)
    symbols = torch.zeros(rows, dtype=torch.int32, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)
    coded = _device_words(torch, words, device)
    decoded = 0
    # rows in slices whose offsets (row * (n + 1), 32-bit in the kernel) stay below 2^31
    for start in range(0, rows, max(1, MAX_OFFSET // (n + 1))):
        stop = min(rows, start + max(1, MAX_OFFSET // (n + 1)))
        _decode_rows[(1,)](prefix[start:stop], scale[start:stop], n, stop - start, state_t, coded, len(words), symbols[start:stop], count,
                           STEP=step_for(n), COARSE=COARSE)
        done = int(count.item())
        decoded += done
        if done < stop - start:
            break
    state[:] = state_t.cpu().numpy().view(np.uint64)
    out[:decoded] = symbols[:decoded].cpu().numpy()
    return decoded
