"""The exact engine in PyTorch: the integers of :mod:`nacrith.exact.reference`, on a CPU or a GPU.

Every operation is integer tensor arithmetic, or a float64 matrix product of integers whose
products and partial sums stay below 2^53, so exact in any order (attention), or
``torch._int_mm`` (int8 x int8 -> int32, exact) for the weight products: an activation
``x`` (|x| <= 8191) is split into ``lo = x & 127`` and ``hi = x >> 7`` (both int8) and the
product is ``128 * (hi @ W) + lo @ W``. No float operation whose last bit could differ
between devices reaches a result, so a GPU computes the same logits as the C kernel and the
numpy reference (tests/test_exact_torch.py checks it on the CPU; bench/gpu_exact.py on a GPU).

PyTorch is an optional dependency (``pip install nacrith[gpu]``); :func:`require_torch`
says so in one line where it is missing.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import EngineError
from . import tables
from .reference import ACT_BITS, F, KV_BITS, LOG2E, PROB_BITS, PROB_MAX, SCORE_BITS, SCORE_LIMIT, float32_parts, kq_of
from .weights import ExactWeights

INT32_MAX = (1 << 31) - 1
MIN_INT_MM_ROWS = 17  # torch._int_mm on CUDA wants more than 16 rows: smaller batches are padded


def require_torch():
    """The torch module, or :class:`EngineError` saying how to install it."""
    try:
        import torch
    except ImportError:
        raise EngineError("the exact engine's PyTorch implementation needs PyTorch: pip install 'nacrith[gpu]' (or make install-gpu)") from None
    return torch


class CudaDevice(NamedTuple):
    """A GPU PyTorch sees, as :func:`cuda_devices` lists it (the fields of
    :class:`nacrith.devices.Device` that the worker plan reads)."""

    index: int
    name: str
    description: str
    free_bytes: int
    total_bytes: int


def cuda_devices() -> list[CudaDevice]:
    """The CUDA GPUs PyTorch sees, with their free memory; :class:`EngineError` where
    PyTorch is missing or has no CUDA (the exact engine runs on GPUs through PyTorch)."""
    torch = require_torch()
    if not torch.cuda.is_available():
        raise EngineError("--gpus with the exact engine needs PyTorch with CUDA and a GPU it sees "
                          f"(torch {torch.__version__} here{'' if torch.version.cuda else ', a CPU build'}; make install-gpu)")
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        found.append(CudaDevice(index, name, name, free, total))
    return found


def rnd(torch, value, shift):
    """``reference.rnd``: ``value / 2^shift`` rounded half up; shift <= 0 multiplies, saturating at 2^62."""
    if isinstance(shift, int):  # a constant: no tensor from the host (on a GPU that copy waits for the device)
        if shift > 0:
            s = min(shift, 63)
            return (value >> s) + ((value >> (s - 1)) & 1)
        left = min(-shift, 62)
        limit = 1 << (62 - left)
        return torch.where(value >= limit, torch.full_like(value, 1 << 62),
                           torch.where(value < -limit, torch.full_like(value, -(1 << 62)), torch.bitwise_left_shift(value, left)))
    right = torch.clamp(shift, 1, 63)
    down = (value >> right) + ((value >> (right - 1)) & 1)
    left = torch.clamp(-shift, 0, 62)
    limit = torch.bitwise_left_shift(torch.ones_like(left), 62 - left)
    up = torch.where(value >= limit, torch.full_like(value, 1 << 62),
                     torch.where(value < -limit, torch.full_like(value, -(1 << 62)), torch.bitwise_left_shift(value, left)))
    return torch.where(shift > 0, down, up)


def sat32(torch, value):
    """Saturate to +-(2^31 - 1)."""
    return torch.clamp(value, -INT32_MAX, INT32_MAX)


def bit_length(torch, value):
    """Bits of each non-negative int64 (0 for 0), by comparisons (exact for every value)."""
    out = torch.zeros_like(value)
    v = value.clone()
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << step)
        out += big.long() * step
        v = torch.where(big, v >> step, v)
    return out + (v > 0).long()


def quantize(torch, values, bits: int):
    """``reference.quantize`` along the last axis: (q, t)."""
    largest = values.abs().amax(dim=-1)
    t = torch.where(largest == 0, torch.zeros_like(largest), bit_length(torch, largest) - bits)
    limit = (1 << bits) - 1
    return torch.clamp(rnd(torch, values, t.unsqueeze(-1)), -limit, limit), t


def isqrt(torch, value):
    """``floor(sqrt(value))`` of non-negative int64 below 2^62, exactly (a float64 estimate
    corrected by integer comparisons)."""
    r = torch.floor(torch.sqrt(value.double())).long()
    for _ in range(2):
        r = torch.where(r * r > value, r - 1, r)
    for _ in range(2):
        r = torch.where((r + 1) * (r + 1) <= value, r + 1, r)
    return r


class TorchModel:
    """An :class:`ExactWeights` as tensors on ``device`` ("cpu", "cuda", "cuda:1", ...)."""

    def __init__(self, weights: ExactWeights, device: str = "cpu"):
        torch = require_torch()
        self.torch, self.weights, self.hyper = torch, weights, weights.hyper
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # the attention's float32 products are exact only in full float32: never TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

        def tensor(array, dtype=None):
            array = np.asarray(array)
            if not array.flags.writeable:  # (mapped from the cache file) torch wants a writable array
                array = array.copy()
            return torch.as_tensor(np.ascontiguousarray(array), device=self.device, dtype=dtype)

        def matrix(m):
            # [n_in, n_out] column-major view of the row-major int8 rows, as _int_mm takes it
            return {"w": tensor(m.q).t(), "m": tensor(m.m, torch.int64), "e": tensor(m.e, torch.int64)}

        self.layers = []
        for layer in weights.layers:
            self.layers.append({name: matrix(layer[name]) for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
                               | {name: (tensor(layer[name].G, torch.int64), layer[name].bits) for name in ("attn_norm", "ffn_norm")})
        self.embedding = {"q": tensor(weights.embedding.q), "m": tensor(weights.embedding.m, torch.int64), "e": tensor(weights.embedding.e, torch.int64)}
        self.output = matrix(weights.output)
        self.output_norm = (tensor(weights.output_norm.G, torch.int64), weights.output_norm.bits)
        self.exp2 = tensor(tables.exp2_table(), torch.int64)
        self.sigmoid = tensor(tables.sigmoid_table(), torch.int64)
        self.eps_m, self.eps_e = float32_parts(self.hyper.rms_eps)
        self.kq = kq_of(self.hyper.head_dim)


class TorchContext:
    """``n_streams`` lockstep streams of at most ``ctx`` cells, as
    :class:`nacrith.exact.reference.ReferenceContext`, on the model's device."""

    def __init__(self, model: TorchModel, n_streams: int, ctx: int):
        torch, h = model.torch, model.hyper
        self.torch, self.model, self.h, self.n_streams, self.ctx = torch, model, h, n_streams, ctx
        device = model.device
        cos, sin = tables.rope_table(h.rope_base, h.n_rot, ctx)
        self.cos, self.sin = torch.tensor(np.array(cos), device=device), torch.tensor(np.array(sin), device=device)
        shape = (h.n_layer, n_streams, h.n_head_kv, ctx)
        self.k = torch.zeros(shape + (h.head_dim,), dtype=torch.int8, device=device)
        self.v = torch.zeros(shape + (h.head_dim,), dtype=torch.int8, device=device)
        self.k_exp = torch.zeros(shape, dtype=torch.int64, device=device)
        self.v_exp = torch.zeros(shape, dtype=torch.int64, device=device)
        self._graph = None
        from . import triton_step

        # the fused Triton kernels of nacrith.exact.triton_step (NACRITH_EXACT_TRITON=1 on a
        # GPU, or in Triton's interpreter; heads of a power-of-two width): the same integers
        power_of_two = h.head_dim & (h.head_dim - 1) == 0
        self.fused = triton_step if triton_step.enabled(torch.device(device)) and power_of_two else None
        self._split = None  # (q, hi, lo) of the last product's input

    def step_graph(self, tokens, positions):
        """:meth:`step` for all ``n_streams`` streams over the whole window, replayed from a
        CUDA graph captured on the first call (fixed shapes: cells past a stream's position
        are masked, as :meth:`step` leaves them out); the int64 logits of every stream, on the
        GPU, valid until the next call."""
        torch = self.torch
        if self._graph is None:
            self._tokens = torch.zeros(self.n_streams, dtype=torch.int64, device=self.model.device)
            self._positions = torch.zeros(self.n_streams, dtype=torch.int64, device=self.model.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            saved = [tensor.clone() for tensor in (self.k, self.v, self.k_exp, self.v_exp)]
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up runs (they write cell 0; the cache is restored below)
                    self._forward(self._tokens, self._positions, self.ctx)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._forward(self._tokens, self._positions, self.ctx)
            for tensor, kept in zip((self.k, self.v, self.k_exp, self.v_exp), saved):
                tensor.copy_(kept)
        self._tokens.copy_(torch.as_tensor(np.asarray(tokens, np.int64)))
        self._positions.copy_(torch.as_tensor(np.asarray(positions, np.int64)))
        self._graph.replay()
        return self._graph_logits

    def reset(self) -> None:
        """Forget every stream's tokens."""
        for tensor in (self.k, self.v, self.k_exp, self.v_exp):
            tensor.zero_()

    # --- operations ---------------------------------------------------------------------

    def _matmul(self, q, k, w, residual=None):
        """``reference.matmul``: q int64 [n, n_in] (|q| <= 8191), k [n] -> int64 [n, n_out] at F;
        with ``residual``, ``sat32(residual + product)``. The int8 halves of the last ``q``
        are kept for the next product of the same ``q`` (a layer's q, k and v; gate and up)."""
        torch = self.torch
        n = q.shape[0]
        rows = max(n, MIN_INT_MM_ROWS) if q.is_cuda else n
        if self._split is not None and self._split[0] is q:
            hi, lo = self._split[1:]
        elif self.fused is not None:
            hi, lo = self.fused.split(torch, q, rows)
        else:
            hi = torch.zeros((rows, q.shape[1]), dtype=torch.int8, device=q.device)
            lo = torch.zeros_like(hi)
            hi[:n] = (q >> 7).to(torch.int8)
            lo[:n] = (q & 127).to(torch.int8)
        self._split = (q, hi, lo)
        if self.fused is not None:
            return self.fused.matmul_epilogue(torch, torch._int_mm(hi, w["w"])[:n], torch._int_mm(lo, w["w"])[:n], w["m"], w["e"], k, residual)
        acc = 128 * torch._int_mm(hi, w["w"])[:n].long() + torch._int_mm(lo, w["w"])[:n].long()
        product = sat32(torch, rnd(torch, acc * w["m"], w["e"] - k.unsqueeze(1) - F))
        return product if residual is None else sat32(torch, residual + product)

    def _rms_scale(self, x):
        torch, n = self.torch, x.shape[-1]
        sh = torch.clamp(bit_length(torch, x.abs().amax(dim=-1)) - 24, min=0)
        xs = x >> sh.unsqueeze(-1)
        s = (xs * xs).sum(dim=-1)
        e_term = rnd(torch, torch.full_like(sh, self.model.eps_m * n), -(self.model.eps_e + 2 * F) + 2 * sh)
        d = s + e_term
        zero = d == 0
        d = torch.where(zero, torch.ones_like(d), d)
        u = torch.div(62 - bit_length(torch, d), 2, rounding_mode="floor")
        j = torch.div(d << (2 * u), n, rounding_mode="floor")
        r = isqrt(torch, j)
        b = bit_length(torch, r)
        c = torch.div(torch.bitwise_left_shift(torch.ones_like(b), 14 + b), r, rounding_mode="floor")
        k = u + F - sh - 14 - b
        return torch.where(zero, torch.zeros_like(c), c), torch.where(zero, torch.zeros_like(k), k)

    def _norm_quantize(self, x, gain):
        G, bits = gain
        if self.fused is not None:
            return self.fused.norm_quantize(self.torch, x, G, bits, self.model.eps_m, self.model.eps_e)
        c, k_norm = self._rms_scale(x)
        q, t = quantize(self.torch, x * G * c.unsqueeze(1), ACT_BITS)
        return q, t - F - bits + k_norm

    def _quantize(self, values, bits: int):
        """:func:`quantize`, in one fused kernel where :attr:`fused` is on."""
        if self.fused is not None:
            return self.fused.quantize(self.torch, values, bits)
        return quantize(self.torch, values, bits)

    def _rope_streams(self, x, cos, sin):
        """:meth:`_rope` of [n, heads, head_dim] with each stream's own cos and sin rows."""
        if self.fused is not None:
            return self.fused.rope(self.torch, x, cos, sin)
        return self._rope(x, cos, sin)

    def _rope(self, x, cos, sin):
        n_rot = self.h.n_rot
        out = x.clone()
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = rnd(self.torch, a * cos - b * sin, 30)
        out[..., 1:n_rot:2] = rnd(self.torch, a * sin + b * cos, 30)
        return out

    def _exp2_neg(self, distance):
        torch = self.torch
        y = torch.clamp(distance, max=INT32_MAX) * LOG2E
        n = torch.clamp(y >> 46, max=63)
        return self.model.exp2[(y >> 36) & 1023] >> n

    def step(self, tokens, positions, want=None) -> np.ndarray:
        """Feed ``tokens[i]`` at cell ``positions[i]`` of stream ``i``; int64 logits at F of the
        streams with ``want`` true, as a numpy array."""
        logits = self.step_tensor(tokens, positions, want)
        return logits.cpu().numpy() if logits is not None else np.empty((0, self.h.n_vocab), np.int64)

    def step_tensor(self, tokens, positions, want=None):
        """:meth:`step`'s logits as an int64 tensor on the model's device (None when no
        stream wants logits)."""
        torch = self.torch
        positions = np.asarray(positions, np.int64)
        length = int(positions.max()) + 1
        tokens_t = torch.as_tensor(np.asarray(tokens, np.int64), device=self.model.device)
        positions_t = torch.as_tensor(positions, device=self.model.device)
        rows = None if want is None else torch.as_tensor(np.asarray(want, bool), device=self.model.device)
        if rows is not None and not bool(np.asarray(want, bool).any()):
            rows = "none"
        return self._forward(tokens_t, positions_t, length, rows)

    def _forward(self, tokens, positions, length: int, rows=None):
        """The step on device tensors, attending to cells below ``length``; logits of the
        streams ``rows`` selects (all when None; None returned for "none")."""
        torch, h, m = self.torch, self.h, self.model
        device = m.device
        n = len(tokens)
        streams = torch.arange(n, device=device)
        emb = m.embedding
        x = sat32(torch, rnd(torch, emb["q"][tokens].long() * emb["m"][tokens].unsqueeze(1), emb["e"][tokens].unsqueeze(1) - F))
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        group = h.n_head // h.n_head_kv
        cells = torch.arange(length, device=device)
        valid = cells.unsqueeze(0) <= positions.unsqueeze(1)  # [n, length]
        for index, layer in enumerate(m.layers):
            q, k = self._norm_quantize(x, layer["attn_norm"])
            query = self._rope_streams(self._matmul(q, k, layer["attn_q"]).view(n, h.n_head, h.head_dim), cos, sin)
            key = self._rope_streams(self._matmul(q, k, layer["attn_k"]).view(n, h.n_head_kv, h.head_dim), cos, sin)
            value = self._matmul(q, k, layer["attn_v"]).view(n, h.n_head_kv, h.head_dim)
            k8, kt = self._quantize(key, KV_BITS)
            v8, vt = self._quantize(value, KV_BITS)
            self.k[index, streams, :, positions] = k8.to(torch.int8)
            self.v[index, streams, :, positions] = v8.to(torch.int8)
            self.k_exp[index, streams, :, positions] = kt - F
            self.v_exp[index, streams, :, positions] = vt - F
            out = self._attend(index, query, n, length, valid, group, positions)
            q, t = self._quantize(out.reshape(n, h.n_embd), ACT_BITS)
            x = self._matmul(q, t - F, layer["attn_output"], residual=x)
            q, k = self._norm_quantize(x, layer["ffn_norm"])
            gate = self._matmul(q, k, layer["ffn_gate"])
            up = self._matmul(q, k, layer["ffn_up"])
            if self.fused is not None:
                q, t = self.fused.silu_quantize(torch, gate, up, m.sigmoid)
            else:
                index_s = torch.clamp(rnd(torch, gate, F - tables.SIGMOID_STEP_BITS), -tables.SIGMOID_RANGE, tables.SIGMOID_RANGE)
                silu = rnd(torch, gate * m.sigmoid[index_s + tables.SIGMOID_RANGE], 30)
                q, t = quantize(torch, silu * up, ACT_BITS)
            x = self._matmul(q, t - 2 * F, layer["ffn_down"], residual=x)
        if isinstance(rows, str):
            return None
        q, k = self._norm_quantize(x if rows is None else x[rows], m.output_norm)
        return self._matmul(q, k, m.output)

    def _attend(self, index, query, n, length, valid, group, positions):
        """Attention of every stream's query heads over its cells (reference._attend, batched):
        int64 [n, n_head, head_dim] at F."""
        torch, h = self.torch, self.h
        qq, qt = self._quantize(query, ACT_BITS)  # [n, H, hd], [n, H]
        if self.fused is not None:
            return self.fused.attend(torch, qq, qt, self.k[index], self.k_exp[index], self.v[index], self.v_exp[index], positions, length,
                                     self.model.exp2, self.model.kq)
        q_exp = (qt - F).view(n, h.n_head_kv, group, 1)
        keys = self.k[index, :n, :, :length].float().transpose(-1, -2)  # [n, kv, hd, L]
        k_exp = self.k_exp[index, :n, :, :length].unsqueeze(2)  # [n, kv, 1, L]
        qv = qq.view(n, h.n_head_kv, group, h.head_dim)
        # q = 128 hi + lo: each float32 product below 2^24 in every partial sum, so exact
        dots = 128 * torch.matmul((qv >> 7).float(), keys).long() + torch.matmul((qv & 127).float(), keys).long()
        scores = torch.clamp(rnd(torch, dots * self.model.kq, 30 - SCORE_BITS - q_exp - k_exp), -SCORE_LIMIT, SCORE_LIMIT)
        mask = valid.view(n, 1, 1, length)
        scores = torch.where(mask, scores, torch.full_like(scores, -(1 << 62)))
        best = scores.amax(dim=-1, keepdim=True)
        e = torch.where(mask, self._exp2_neg(best - scores), torch.zeros_like(scores))
        total = e.sum(dim=-1, keepdim=True)
        inverse = torch.div(torch.full_like(total, 1 << 58), total, rounding_mode="floor")
        p = torch.clamp((e * inverse) >> (58 - PROB_BITS), max=PROB_MAX)
        v_exp = self.v_exp[index, :n, :, :length]  # [n, kv, L]
        top = torch.where(valid.view(n, 1, length), v_exp, torch.full_like(v_exp, -(1 << 40))).amax(dim=-1, keepdim=True)
        shift = torch.clamp(top - v_exp, 0, 63).unsqueeze(2)  # [n, kv, 1, L]
        w = p >> shift
        sums = torch.matmul(w.float(), self.v[index, :n, :, :length].float()).long()  # [n, kv, G, hd]; sum(w) < 2^15: exact
        top = top.unsqueeze(2)  # [n, kv, 1, 1]
        return sat32(torch, rnd(torch, sums, PROB_BITS - F - top)).view(n, h.n_head, h.head_dim)

    def slide(self, stream: int, keep: int, drop: int, length: int) -> None:
        """``reference.ReferenceContext.slide``."""
        torch = self.torch
        moved = slice(keep, length - drop)
        source = slice(keep + drop, length)
        for tensor in (self.k, self.v, self.k_exp, self.v_exp):
            tensor[:, stream, :, moved] = tensor[:, stream, :, source].clone()
        keys = self.k[:, stream, :, moved].long() << 16
        rotated = self._rope(keys, self.cos[drop], -self.sin[drop])
        q, t = quantize(torch, rotated, KV_BITS)
        self.k[:, stream, :, moved] = q.to(torch.int8)
        self.k_exp[:, stream, :, moved] += t - 16
