"""Fused Triton kernels for the PyTorch implementation's step (opt-in: ``NACRITH_EXACT_TRITON=1``).

The PyTorch step (:mod:`nacrith.exact.torch_engine`) spells each integer primitive of the
spec as several tensor operations: ``rnd`` with a per-row shift is about 17 of them,
``quantize`` about 50, the RMSNorm scale over 100. One step of SmolLM2-135M's 30 layers runs
about 40,000 tensor operations (``torch.profiler`` on the CPU, 32 streams), and on a GPU each is a kernel
launch: an H200 ran the eager step at 1024 streams in about 440 ms whatever the window
(bench/results/gpu-exact-h200.json), about 11 us per operation, as launches and not
arithmetic would take. These kernels do the
same integer arithmetic, each for whole rows in one launch, so that a layer takes about 20
of them beside its 14 ``torch._int_mm`` products and its cache writes:

* :func:`norm_quantize`: RMSNorm's integer scale, the gain and the 13-bit quantisation of
  the result (``TorchContext._norm_quantize``);
* :func:`quantize`: ``reference.quantize`` along the last axis;
* :func:`split`: a product's input as its int8 halves ``q >> 7`` and ``q & 127``;
* :func:`matmul_epilogue`: ``sat32(rnd((128 hi + lo) * m, e - k - F))`` after the two
  ``torch._int_mm`` products, and the residual stream's saturating update;
* :func:`rope`: the rotary embedding of every stream's heads at its own position;
* :func:`attend`: a stream's query heads over its int8 KV cache (scores, integer softmax,
  the weighted values), in three passes over its cells;
* :func:`silu_quantize`: the feed-forward's SiLU from the sigmoid table, times ``up``,
  quantised.

Integers have no rounding, so a fused kernel cannot change a result as fused float code
can; the one float operation, the square root's float64 estimate, is corrected by integer
comparisons as in :func:`nacrith.exact.torch_engine.isqrt`. tests/test_triton_step.py runs
each kernel in Triton's interpreter against the tensor operations, and the whole step
against the C kernel.
"""
from __future__ import annotations

import os

from .reference import ACT_BITS, F

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU build comes without Triton
    triton = tl = None


ATTEND_CELLS = 32  # cells per block of the attention kernel's passes (the tests take 8: several blocks in a short window)


def enabled(device) -> bool:
    """Whether the step uses these kernels on ``device``: ``NACRITH_EXACT_TRITON=1``, Triton
    installed, and a CUDA device (or Triton's interpreter, on the CPU)."""
    if os.environ.get("NACRITH_EXACT_TRITON") != "1" or triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int) -> int:
    block = 16
    while block < n:
        block *= 2
    return block


if triton is not None:
    @triton.jit
    def _bit_length(v):
        """Bits of each non-negative int64 (0 for 0)."""
        out = tl.zeros_like(v)
        for step in tl.static_range(6):
            width = 32 >> step
            big = v >= (tl.full(v.shape, 1, tl.int64) << width)
            out += tl.where(big, width, 0)
            v = tl.where(big, v >> width, v)
        return out + tl.where(v > 0, 1, 0)

    @triton.jit
    def _rnd(value, shift):
        """``reference.rnd`` for int64 values and shifts (broadcast)."""
        right = tl.minimum(tl.maximum(shift, 1), 63)
        down = (value >> right) + ((value >> (right - 1)) & 1)
        left = tl.minimum(tl.maximum(-shift, 0), 62)
        limit = tl.full(left.shape, 1, tl.int64) << (62 - left)
        top = tl.full(value.shape, 1 << 62, tl.int64)
        up = tl.where(value >= limit, top, tl.where(value < -limit, -top, value << left))
        return tl.where(shift > 0, down, up)

    @triton.jit
    def _quantize_row(values, inside, BITS: tl.constexpr):
        largest = tl.max(tl.where(inside, tl.abs(values), 0), axis=0)
        t = tl.where(largest == 0, 0, _bit_length(largest) - BITS)
        limit = (1 << BITS) - 1
        q = tl.minimum(tl.maximum(_rnd(values, t), -limit), limit)
        return q, t

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, t_ptr, n, BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < n
        values = tl.load(x_ptr + row * n + columns, mask=inside, other=0)
        q, t = _quantize_row(values, inside, BITS)
        tl.store(q_ptr + row * n + columns, q, mask=inside)
        tl.store(t_ptr + row, t)

    @triton.jit
    def _norm_quantize_kernel(x_ptr, gain_ptr, q_ptr, t_ptr, n, eps_mn, eps_shift, gain_bits,
                              F_: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < n
        x = tl.load(x_ptr + row * n + columns, mask=inside, other=0)
        # rms_scale: c * 2^k about 1 / sqrt(mean(x^2) + eps)
        largest = tl.max(tl.abs(x), axis=0)
        sh = tl.maximum(_bit_length(largest) - 24, 0)
        xs = x >> sh
        s = tl.sum(xs * xs, axis=0)
        e_term = _rnd(tl.full((), 0, tl.int64) + eps_mn, eps_shift + 2 * sh)
        d = s + e_term
        zero = d == 0
        d = tl.where(zero, 1, d)
        u = (62 - _bit_length(d)) // 2
        j = (d << (2 * u)) // n
        r = tl.sqrt(j.to(tl.float64)).to(tl.int64)  # floor: non-negative
        r = tl.where(r * r > j, r - 1, r)
        r = tl.where(r * r > j, r - 1, r)
        r = tl.where((r + 1) * (r + 1) <= j, r + 1, r)
        r = tl.where((r + 1) * (r + 1) <= j, r + 1, r)
        b = _bit_length(r)
        c = (tl.full((), 1, tl.int64) << (14 + b)) // r
        k = u + F_ - sh - 14 - b
        c = tl.where(zero, 0, c)
        k = tl.where(zero, 0, k)
        gain = tl.load(gain_ptr + columns, mask=inside, other=0)
        q, t = _quantize_row(x * gain * c, inside, BITS)
        tl.store(q_ptr + row * n + columns, q, mask=inside)
        tl.store(t_ptr + row, t - F_ - gain_bits + k)

    @triton.jit
    def _split_kernel(q_ptr, hi_ptr, lo_ptr, n, total, BLOCK: tl.constexpr):
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        inside = at < total  # the padding rows (at >= n) become zeros
        q = tl.load(q_ptr + at, mask=at < n, other=0)
        tl.store(hi_ptr + at, (q >> 7).to(tl.int8), mask=inside)
        tl.store(lo_ptr + at, (q & 127).to(tl.int8), mask=inside)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half, HD: tl.constexpr, BLOCK_HALF: tl.constexpr):
        stream = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        row = (stream * heads + head) * HD
        dims = tl.arange(0, HD)
        tl.store(out_ptr + row + dims, tl.load(x_ptr + row + dims), mask=dims >= 2 * half)  # past n_rot: unchanged
        pairs = tl.arange(0, BLOCK_HALF).to(tl.int64)
        inside = pairs < half
        a = tl.load(x_ptr + row + 2 * pairs, mask=inside, other=0)
        b = tl.load(x_ptr + row + 2 * pairs + 1, mask=inside, other=0)
        c = tl.load(cos_ptr + stream * half + pairs, mask=inside, other=0)
        s = tl.load(sin_ptr + stream * half + pairs, mask=inside, other=0)
        thirty = tl.full((BLOCK_HALF,), 30, tl.int64)
        tl.store(out_ptr + row + 2 * pairs, _rnd(a * c - b * s, thirty), mask=inside)
        tl.store(out_ptr + row + 2 * pairs + 1, _rnd(a * s + b * c, thirty), mask=inside)

    @triton.jit
    def _silu_quantize_kernel(gate_ptr, up_ptr, sigmoid_ptr, q_ptr, t_ptr, n, SHIFT: tl.constexpr, RANGE: tl.constexpr,
                              BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < n
        gate = tl.load(gate_ptr + row * n + columns, mask=inside, other=0)
        up = tl.load(up_ptr + row * n + columns, mask=inside, other=0)
        index = tl.minimum(tl.maximum(_rnd(gate, tl.full((BLOCK,), SHIFT, tl.int64)), -RANGE), RANGE)
        silu = _rnd(gate * tl.load(sigmoid_ptr + index + RANGE, mask=inside, other=0), tl.full((BLOCK,), 30, tl.int64))
        q, t = _quantize_row(silu * up, inside, BITS)
        tl.store(q_ptr + row * n + columns, q, mask=inside)
        tl.store(t_ptr + row, t)

    @triton.jit
    def _epilogue_kernel(hi_ptr, lo_ptr, m_ptr, e_ptr, k_ptr, residual_ptr, out_ptr, rows, n, F_: tl.constexpr,
                         RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        inside = (r[:, None] < rows) & (c[None, :] < n)
        at = r[:, None] * n + c[None, :]
        acc = 128 * tl.load(hi_ptr + at, mask=inside, other=0).to(tl.int64) + tl.load(lo_ptr + at, mask=inside, other=0).to(tl.int64)
        m = tl.load(m_ptr + c, mask=c < n, other=0)
        e = tl.load(e_ptr + c, mask=c < n, other=0)
        k = tl.load(k_ptr + r, mask=r < rows, other=0)
        value = _rnd(acc * m[None, :], e[None, :] - k[:, None] - F_)
        limit = 2147483647
        value = tl.minimum(tl.maximum(value, -limit), limit)
        if RESIDUAL:  # sat32(x + product): the residual stream's update
            value = tl.minimum(tl.maximum(value + tl.load(residual_ptr + at, mask=inside, other=0), -limit), limit)
        tl.store(out_ptr + at, value, mask=inside)

    @triton.jit
    def _scores(q, q_exp, k_ptr, k_exp_ptr, base, exp_base, cells, valid, kq, HD: tl.constexpr, SCORE_BITS_: tl.constexpr,
                SCORE_LIMIT_: tl.constexpr):
        """Scores [G, L] of the G query heads q [G, HD] against the keys of ``cells``."""
        dims = tl.arange(0, HD).to(tl.int64)
        keys = tl.load(k_ptr + base + cells[:, None] * HD + dims[None, :], mask=valid[:, None], other=0).to(tl.int64)
        dots = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        k_exp = tl.load(k_exp_ptr + exp_base + cells, mask=valid, other=0)
        scores = _rnd(dots * kq, 30 - SCORE_BITS_ - q_exp[:, None] - k_exp[None, :])
        scores = tl.minimum(tl.maximum(scores, -SCORE_LIMIT_), SCORE_LIMIT_)
        return tl.where(valid[None, :], scores, -(1 << 62))

    @triton.jit
    def _exp2_neg(distance, exp2_ptr, LOG2E_: tl.constexpr):
        y = tl.minimum(distance, 2147483647) * LOG2E_
        n = tl.minimum(y >> 46, 63)
        return tl.load(exp2_ptr + ((y >> 36) & 1023)) >> n

    @triton.jit
    def _attend_kernel(q_ptr, q_exp_ptr, k_ptr, k_exp_ptr, v_ptr, v_exp_ptr, positions_ptr, exp2_ptr, out_ptr, length, ctx, n_kv, kq,
                       G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr, BLOCK_L: tl.constexpr, F_: tl.constexpr,
                       SCORE_BITS_: tl.constexpr, SCORE_LIMIT_: tl.constexpr, PROB_BITS_: tl.constexpr, LOG2E_: tl.constexpr):
        stream = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        heads = tl.arange(0, BLOCK_G).to(tl.int64)
        real = heads < G
        dims = tl.arange(0, HD).to(tl.int64)
        query = (stream * n_kv + head) * G + heads  # query heads of this KV head, [BLOCK_G]
        q = tl.load(q_ptr + query[:, None] * HD + dims[None, :], mask=real[:, None], other=0)
        q_exp = tl.load(q_exp_ptr + query, mask=real, other=0)
        position = tl.load(positions_ptr + stream)
        base = (stream * n_kv + head) * ctx * HD  # this stream's and KV head's cells
        exp_base = (stream * n_kv + head) * ctx
        # pass 1: each query head's best score; the values' largest exponent
        best = tl.full((BLOCK_G,), -(1 << 62), tl.int64)
        top = tl.full((), -(1 << 40), tl.int64)
        for start in range(0, length, BLOCK_L):
            cells = start + tl.arange(0, BLOCK_L).to(tl.int64)
            valid = (cells < length) & (cells <= position)
            scores = _scores(q, q_exp, k_ptr, k_exp_ptr, base, exp_base, cells, valid, kq, HD, SCORE_BITS_, SCORE_LIMIT_)
            best = tl.maximum(best, tl.max(scores, axis=1))
            v_exp = tl.load(v_exp_ptr + exp_base + cells, mask=valid, other=-(1 << 40))
            top = tl.maximum(top, tl.max(v_exp, axis=0))
        # pass 2: the sum of exp2(score - best)
        total = tl.zeros((BLOCK_G,), tl.int64)
        for start in range(0, length, BLOCK_L):
            cells = start + tl.arange(0, BLOCK_L).to(tl.int64)
            valid = (cells < length) & (cells <= position)
            scores = _scores(q, q_exp, k_ptr, k_exp_ptr, base, exp_base, cells, valid, kq, HD, SCORE_BITS_, SCORE_LIMIT_)
            e = tl.where(valid[None, :], _exp2_neg(best[:, None] - scores, exp2_ptr, LOG2E_), 0)
            total += tl.sum(e, axis=1)
        inverse = (tl.full((BLOCK_G,), 1 << 58, tl.int64)) // tl.where(real, total, 1)
        # pass 3: weights p, shifted to each value's exponent, times the int8 values
        sums = tl.zeros((BLOCK_G, HD), tl.int64)
        for start in range(0, length, BLOCK_L):
            cells = start + tl.arange(0, BLOCK_L).to(tl.int64)
            valid = (cells < length) & (cells <= position)
            scores = _scores(q, q_exp, k_ptr, k_exp_ptr, base, exp_base, cells, valid, kq, HD, SCORE_BITS_, SCORE_LIMIT_)
            e = tl.where(valid[None, :], _exp2_neg(best[:, None] - scores, exp2_ptr, LOG2E_), 0)
            p = tl.minimum((e * inverse[:, None]) >> (58 - PROB_BITS_), (1 << PROB_BITS_) - 1)
            v_exp = tl.load(v_exp_ptr + exp_base + cells, mask=valid, other=0)
            w = p >> tl.minimum(tl.maximum(top - v_exp, 0), 63)[None, :]
            values = tl.load(v_ptr + base + cells[:, None] * HD + dims[None, :], mask=valid[:, None], other=0).to(tl.int64)
            sums += tl.sum(w[:, :, None] * values[None, :, :], axis=1)
        out = _rnd(sums, PROB_BITS_ - F_ - top)
        out = tl.minimum(tl.maximum(out, -2147483647), 2147483647)
        tl.store(out_ptr + query[:, None] * HD + dims[None, :], out, mask=real[:, None])


def quantize(torch, values, bits: int):
    """``torch_engine.quantize`` of int64 ``values`` (last axis) in one launch: (q, t)."""
    shape = values.shape
    x = values.reshape(-1, shape[-1]).contiguous()
    q = torch.empty_like(x)
    t = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0]:
        _quantize_kernel[(x.shape[0],)](x, q, t, shape[-1], BITS=bits, BLOCK=_block(shape[-1]))
    return q.view(shape), t.view(shape[:-1])


def norm_quantize(torch, x, gain, gain_bits: int, eps_m: int, eps_e: int):
    """``TorchContext._norm_quantize`` of int64 ``x`` [rows, n] with the gain tensor: (q, t)."""
    rows, n = x.shape
    x = x.contiguous()
    q = torch.empty_like(x)
    t = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _norm_quantize_kernel[(rows,)](x, gain, q, t, n, eps_m * n, -(eps_e + 2 * F), gain_bits, F_=F, BITS=ACT_BITS, BLOCK=_block(n))
    return q, t


def attend(torch, qq, qt, k, k_exp, v, v_exp, positions, length: int, exp2, kq: int):
    """``TorchContext._attend`` after the query's quantisation: ``qq`` [n, H, hd] and its
    exponents ``qt`` [n, H], one layer's cache ``k``, ``v`` (int8 [streams, kv, ctx, hd]) and
    ``k_exp``, ``v_exp`` ([streams, kv, ctx]), each stream's ``positions``; int64 [n, H, hd]."""
    from .reference import LOG2E, PROB_BITS, SCORE_BITS, SCORE_LIMIT

    n, n_head, head_dim = qq.shape
    n_kv, ctx = k.shape[1], k.shape[2]
    group = n_head // n_kv
    out = torch.empty((n, n_head, head_dim), dtype=torch.int64, device=qq.device)
    if n:
        _attend_kernel[(n, n_kv)](qq.contiguous(), (qt - F).contiguous(), k, k_exp, v, v_exp, positions, exp2, out, length, ctx, n_kv, kq,
                                  G=group, BLOCK_G=max(1, 1 << (group - 1).bit_length()), HD=head_dim,
                                  BLOCK_L=ATTEND_CELLS, F_=F, SCORE_BITS_=SCORE_BITS, SCORE_LIMIT_=SCORE_LIMIT, PROB_BITS_=PROB_BITS, LOG2E_=LOG2E)
    return out


def matmul_epilogue(torch, hi, lo, m, e, k, residual=None):
    """``sat32(rnd((128 hi + lo) * m, e - k - F))``: int32 products [rows, n], per-column m
    and e, per-row k; int64 [rows, n]. With ``residual`` (int64 [rows, n]),
    ``sat32(residual + that)``."""
    rows, n = hi.shape
    out = torch.empty((rows, n), dtype=torch.int64, device=hi.device)
    if rows:
        grid = (triton.cdiv(rows, 16), triton.cdiv(n, 128))
        _epilogue_kernel[grid](hi.contiguous(), lo.contiguous(), m, e, k.contiguous(), out if residual is None else residual.contiguous(), out,
                               rows, n, F_=F, RESIDUAL=residual is not None, BLOCK_R=16, BLOCK_C=128)
    return out


def split(torch, q, rows: int):
    """``q`` (int64 [n, k], |q| <= 8191) as int8 ``hi = q >> 7`` and ``lo = q & 127``, each
    [rows, k] (rows >= n; the rows past n zero, as ``torch._int_mm`` on CUDA wants more than 16)."""
    n, k = q.shape
    hi = torch.empty((rows, k), dtype=torch.int8, device=q.device)
    lo = torch.empty_like(hi)
    total = rows * k
    _split_kernel[(triton.cdiv(total, 1024),)](q.contiguous(), hi, lo, n * k, total, BLOCK=1024)
    return hi, lo


def rope(torch, x, cos, sin):
    """``TorchContext._rope`` of int64 ``x`` [n, heads, head_dim] with each stream's ``cos``
    and ``sin`` rows ([n, 1, n_rot / 2] or [n, n_rot / 2])."""
    n, heads, head_dim = x.shape
    half = cos.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    if n:
        _rope_kernel[(n, heads)](x, cos.reshape(n, half).contiguous(), sin.reshape(n, half).contiguous(), out, heads, half, HD=head_dim,
                                 BLOCK_HALF=_block(half))
    return out


def silu_quantize(torch, gate, up, sigmoid):
    """The feed-forward's ``quantize(rnd(gate * sigmoid(gate), 30) * up, ACT_BITS)`` with the
    sigmoid table (``TorchContext._forward``): (q, t)."""
    from . import tables

    rows, n = gate.shape
    q = torch.empty_like(gate)
    t = torch.empty(rows, dtype=torch.int64, device=gate.device)
    if rows:
        _silu_quantize_kernel[(rows,)](gate.contiguous(), up.contiguous(), sigmoid, q, t, n, SHIFT=F - tables.SIGMOID_STEP_BITS,
                                       RANGE=tables.SIGMOID_RANGE, BITS=ACT_BITS, BLOCK=_block(n))
    return q, t
