"""The ensemble's full-vocabulary arithmetic in integers (preset v5): the same on a CPU and a GPU.

Presets v1-v4 compute the ensemble's rows in float32 and float64 in one fixed order. That
order is what makes them portable, and it is also why they cannot run on a GPU: the bias
tables take each stream's step in stream order, and the row sums follow numpy's pairwise
order. Preset v5 keeps everything per stream (n-gram and match candidates, the mixer's
weights, the confidence skip) as in v4, on the host, and does what touches every
vocabulary entry in integers, where every sum is exact in any order. The "head" below is
that integer part; :class:`NumpyHead` is its reference (numpy) and runs it with nacrith's C
kernel where that is built (``integer_*`` in ``nacrith/_kernels.c``), :class:`TorchHead` runs
it on any PyTorch device; all give the same integers (tests/test_integer_ensemble.py).

Units: a logit ``L`` is an integer at 2^-14 nats (the exact engine's; other engines' float
logits are rounded to it); the bias tables ``B1`` (by the previous token's class) and ``B2``
(by a hash of the previous token) at 2^-22 nats; the temperature ``tau`` at 2^-16. Per step,
for a stream fed by the model (its tables' rows ``r1``, ``r2``, its mixing weight ``a``):

1. ``score = ((L * tau) >> 16) + (B1[r1] >> 8) + (B2[r2] >> 8)`` (``>>`` is floor);
2. ``d = min(max(score) - score, 2^36)``, ``j = min((d * 24204406) >> 32, 64000)`` (1/64 bits
   below the row's best), ``w = ((128 - j % 64) << 23) >> min(j // 64, 31)`` (Schraudolph's
   ``2^(-j/64)`` at 2^30, as :mod:`nacrith.predictors.llm`), ``S = sum(w)``;
3. ``P = (w << 30) // S``: the model's row normalised to 2^30;
4. ``R = ((P * a) >> 16) + C``, with ``a = floor(s_llm * 2^16)`` (``s`` the mixer's softmax,
   computed on the host as in v4) and ``C`` the cheap predictors' additions at their
   candidates, ``floor(sum_k s_k q_k(t) * 2^30)``. A stream that skips the model has
   ``a = 0`` and ``C`` its skip row: ``floor(0.5 * (1 - c) / n * 2^30)`` everywhere, the
   candidates' share, and ``floor(c * 2^30)`` at the top candidate (``c`` its confidence).
   ``R`` fits 32 bits; ``T = sum(R)``; the int24 coder quantises ``R`` as it quantises any
   integer weight row (:class:`~nacrith.coder.WeightRows`).

After the step's tokens ``x`` are known, for the streams the model fed:

5. ``g = (R << 20) // T``, then ``g[x] -= 2^20`` (the code length's gradient at 2^-20);
6. each table (rate ``lr``): first ``Q[r] += (g * g) >> 20`` for every stream (``Q`` the
   sums of squared gradients, at 2^-20, capped at 2^60 once the step's sums are in), then
   ``B[r] -= (g * round(lr * 2^12)) // isqrt(2^20 + Q[r])`` for every stream, then ``B``
   is clamped to ``[-2^30, 2^30]``: AdaGrad's ``lr * g / sqrt(1 + Q)``, with every stream's
   step taken against the step's final ``Q``;
7. the temperature: per stream ``D = min(max(L) - L, 2^20)``, ``m = w >> 8``,
   ``grad = D[x] - sum(m * D) // max(1, sum(m))`` (``E_q[L] - L(x)``, the code length's
   gradient in ``tau``), then ``tau -= (sum(grad) * 26 + 2^15) >> 16`` over the streams,
   clamped to ``[2^12, 2^20]`` (26 is ``round(temperature_lr * 2^18)`` for v4's 1e-4).

The host learns the mixer's weights from three integers per stream, ``R[x]``, ``T`` and
``P[x]``; they, and each stream's coded interval (or, decoding, its symbol), are all that
crosses from a GPU per step.
"""
from __future__ import annotations

import numpy as np

from ..coder import WeightRows
from .llm import _kernels
from .ensemble import EnsembleConfig, EnsemblePredictor, StreamState, token_classes

LOGIT_BITS = 14  # L: the exact engine's logits at 2^-14
BIAS_BITS = 22  # B1, B2 at 2^-22 (score units << 8)
BIAS_SHIFT = BIAS_BITS - LOGIT_BITS
BIAS_LIMIT = 1 << 30
TAU_BITS = 16
TAU_ONE = 1 << TAU_BITS
TAU_MIN, TAU_MAX = 1 << 12, 1 << 20
PROB_BITS = 30  # P and the additions: probabilities at 2^-30
MIX_BITS = 16  # a: the model's mixing weight at 2^-16
GRAD_BITS = 20
LEVEL_MULTIPLIER = 24204406  # round(64 / ln 2 * 2^18): 2^-14 nats to 1/64 bits, at 2^32
DISTANCE_LIMIT = 1 << 36
LEVEL_LIMIT = 1000 * 64  # 2^-1000, as the float presets' LIMIT
TEMPERATURE_DISTANCE_LIMIT = 1 << 20  # 64 nats: weights are 0 long before
SQUARES_LIMIT = 1 << 60


def temperature_rate(lr: float) -> int:
    """The temperature's learning rate as the integer of step 7: ``round(lr * 2^18)`` (26
    for v4's 1e-4: ``tau`` at 2^-16 moves by ``lr`` per nat, the gradient at 2^-14)."""
    return int(round(lr * (1 << 18)))


def rate(lr: float) -> int:
    """A bias table's learning rate as the integer of step 6: ``round(lr * 2^12)``."""
    return int(round(lr * (1 << 12)))


def fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """``floor(values * 2^bits)`` of float64 values as int64 (exact: a power-of-two product)."""
    return np.floor(np.asarray(values, np.float64) * float(1 << bits)).astype(np.int64)


def logits_to_integers(logits: np.ndarray, use_kernel: bool | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Float logits as integers at 2^-14 (int64): ``rint(x * 2^14)`` (half to even), clamped to
    ``[-2^40, 2^40]``, NaN as 0; exact for the exact engine's float32 logits (its integers
    times 2^-14), correctly rounded for other engines'. The C kernel where it is built."""
    logits = np.ascontiguousarray(logits, np.float32)
    if out is None:
        out = np.empty(logits.shape, np.int64)
    if _kernels is not None and hasattr(_kernels, "integer_logits") and use_kernel is not False:
        _kernels.integer_logits(logits, out)
        return out
    scaled = logits.astype(np.float64) * float(1 << LOGIT_BITS)
    scaled[scaled != scaled] = 0.0
    np.copyto(out, np.rint(np.clip(scaled, -2.0 ** 40, 2.0 ** 40)), casting="unsafe")
    return out


class StepInput:
    """What the host hands the head for one step: for the ``m`` streams the model feeds,
    their bias rows ``r1``, ``r2`` (int64) and mixing weights ``a`` (int64, at 2^-16); for all
    ``running`` streams, which are fed (``wanted``: their indices, in stream order), the
    constant ``c0`` of each row (int64) and the additions ``(offsets, tokens, values)``:
    stream ``i``'s are ``tokens[offsets[i]:offsets[i + 1]]`` (distinct), ``values`` at 2^-30."""

    def __init__(self, running: int, wanted: np.ndarray, r1, r2, a, c0, offsets, tokens, values):
        self.running, self.wanted = running, np.asarray(wanted, np.int64)
        self.r1, self.r2, self.a = (np.asarray(v, np.int64) for v in (r1, r2, a))
        self.c0 = np.asarray(c0, np.int64)
        self.offsets, self.tokens, self.values = (np.asarray(v, np.int64) for v in (offsets, tokens, values))


class NumpyHead:
    """The integer head on the host: the module docstring's steps as numpy (the reference),
    or, where nacrith's C kernel is built, its ``integer_*`` functions (the same integers in
    one pass per row; ``use_kernel=False`` forces the reference)."""

    def __init__(self, n_vocab: int, tables1: int, tables2: int, lr1: float, lr2: float, temperature_lr: float,
                 use_kernel: bool | None = None):
        self.n_vocab = n_vocab
        self.use_kernel = _kernels is not None and hasattr(_kernels, "integer_rows") if use_kernel is None else use_kernel
        self.b1 = np.zeros((tables1, n_vocab), np.int64) if tables1 else None
        self.q1 = np.zeros((tables1, n_vocab), np.int64) if tables1 else None
        self.b2 = np.zeros((tables2, n_vocab), np.int64) if tables2 else None
        self.q2 = np.zeros((tables2, n_vocab), np.int64) if tables2 else None
        self.rates = (rate(lr1), rate(lr2))
        self.tau = TAU_ONE
        self._buffers: dict[str, np.ndarray] = {}
        self.tau_rate = temperature_rate(temperature_lr)
        self.learn_temperature = self.tau_rate > 0
        self._step: dict | None = None

    def rows(self, logits: np.ndarray, step: StepInput) -> WeightRows:
        """Steps 1-4: the step's rows ``R`` (uint32, ``running`` x n) and totals ``T``."""
        n, running, wanted = self.n_vocab, step.running, step.wanted
        rows = self._buffer("rows", running, np.int64)
        rows[:] = step.c0[:, None]
        model_p = w_kept = None
        if len(wanted) and self.use_kernel:
            logits = np.ascontiguousarray(logits, np.int64)
            w_kept, model_p = self._buffer("w", len(wanted), np.int64), self._buffer("p", len(wanted), np.int64)
            _kernels.integer_rows(logits, n, self.tau, self.b1, step.r1 if self.b1 is not None else None, self.b2,
                                  step.r2 if self.b2 is not None else None, step.a, step.wanted, w_kept, model_p, rows)
        elif len(wanted):
            logits = np.asarray(logits, np.int64)
            score = (logits * self.tau) >> TAU_BITS
            if self.b1 is not None:
                score += self.b1[step.r1] >> BIAS_SHIFT
            if self.b2 is not None:
                score += self.b2[step.r2] >> BIAS_SHIFT
            distance = np.minimum(score.max(axis=1, keepdims=True) - score, DISTANCE_LIMIT)
            level = np.minimum((distance * LEVEL_MULTIPLIER) >> 32, LEVEL_LIMIT)
            w = ((128 - level % 64) << 23) >> np.minimum(level // 64, 31)
            model_p = (w << PROB_BITS) // w.sum(axis=1, keepdims=True)
            rows[wanted] += (model_p * step.a[:, None]) >> MIX_BITS
            w_kept = w
        stream_of = np.repeat(np.arange(running), np.diff(step.offsets))
        np.add.at(rows, (stream_of, step.tokens), step.values)
        totals = rows.sum(axis=1)
        self._step = dict(input=step, logits=logits if len(wanted) else None, w=w_kept, p=model_p, rows=rows, totals=totals)
        weights = self._buffer("weights", running, np.uint32)
        np.copyto(weights, rows, casting="unsafe")  # R < 2^32
        return WeightRows(weights, totals.astype(np.uint64))

    def _buffer(self, name: str, count: int, dtype) -> np.ndarray:
        """``count`` rows of a buffer kept from step to step (fresh memory each step costs
        page faults: on a VM about as much as the arithmetic), grown as needed."""
        held = self._buffers.get(name)
        if held is None or len(held) < count:
            held = self._buffers[name] = np.empty((max(count, 1), self.n_vocab), dtype)
        return held[:count]

    def integer_logits(self, logits: np.ndarray) -> np.ndarray:
        """:func:`logits_to_integers` into a buffer kept from step to step."""
        return logits_to_integers(logits, out=self._buffer("logits", len(logits), np.int64))

    def coded(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(R[x], T, P[x])`` of the streams the model fed, in their order (int64): what the
        host's mixer learns from."""
        s = self._step
        wanted = s["input"].wanted
        x = np.asarray(symbols, np.int64)[wanted]
        return s["rows"][wanted, x], s["totals"][wanted], s["p"][np.arange(len(wanted)), x] if len(wanted) else np.zeros(0, np.int64)

    def learn(self, symbols: np.ndarray) -> None:
        """Steps 5-7 for the streams the model fed."""
        s, self._step = self._step, None
        step = s["input"]
        wanted = step.wanted
        if not len(wanted):
            return
        x = np.asarray(symbols, np.int64)[wanted]
        if self.use_kernel:
            for table, sums, rows, lr in _tables(self, step):
                _kernels.integer_learn(s["rows"], s["totals"], self.n_vocab, wanted, x, table, sums, rows, lr)
            if self.learn_temperature:
                self._move_temperature(_kernels.integer_temperature(s["logits"], s["w"], self.n_vocab, x))
            return
        gradients = (s["rows"][wanted] << GRAD_BITS) // s["totals"][wanted, None]
        gradients[np.arange(len(wanted)), x] -= 1 << GRAD_BITS
        squares = (gradients * gradients) >> GRAD_BITS
        for table, sums, rows, lr in _tables(self, step):
            for j, row in enumerate(rows.tolist()):
                sums[row] += squares[j]
            touched = np.unique(rows)
            sums[touched] = np.minimum(sums[touched], SQUARES_LIMIT)
            for j, row in enumerate(rows.tolist()):
                table[row] -= (gradients[j] * lr) // isqrt_numpy((1 << GRAD_BITS) + sums[row])
            table[touched] = np.clip(table[touched], -BIAS_LIMIT, BIAS_LIMIT)
        if self.learn_temperature:
            logits = s["logits"]
            distance = np.minimum(logits.max(axis=1, keepdims=True) - logits, TEMPERATURE_DISTANCE_LIMIT)
            m = s["w"] >> 8
            expected = (m * distance).sum(axis=1) // np.maximum(m.sum(axis=1), 1)
            self._move_temperature(int((distance[np.arange(len(wanted)), x] - expected).sum()))

    def _move_temperature(self, grad: int) -> None:
        self.tau = min(max(self.tau - ((grad * self.tau_rate + (1 << 15)) >> 16), TAU_MIN), TAU_MAX)


def _tables(head, step: StepInput):
    """(table, its sums of squares, each fed stream's row of it, rate) of a head's bias tables
    that exist, the class table first: what step 6 runs over."""
    for table, sums, rows, lr in ((head.b1, head.q1, step.r1, head.rates[0]), (head.b2, head.q2, step.r2, head.rates[1])):
        if table is not None:
            yield table, sums, rows, lr


def isqrt_numpy(values: np.ndarray) -> np.ndarray:
    """``floor(sqrt(v))`` of int64 values below 2^62: the float64 root, corrected to the exact integer."""
    root = np.sqrt(values.astype(np.float64)).astype(np.int64)
    root -= root * root > values
    root += (root + 1) * (root + 1) <= values
    return root


class TorchHead:
    """:class:`NumpyHead`'s steps as PyTorch tensor operations on ``device`` (a GPU, or the
    CPU to check them): the same integers. The tables, the temperature and each step's
    rows stay on the device."""

    def __init__(self, torch, device, n_vocab: int, tables1: int, tables2: int, lr1: float, lr2: float, temperature_lr: float):
        self.torch, self.device, self.n_vocab = torch, device, n_vocab

        def zeros(count):
            return torch.zeros((count, n_vocab), dtype=torch.int64, device=device) if count else None

        self.b1, self.q1, self.b2, self.q2 = zeros(tables1), zeros(tables1), zeros(tables2), zeros(tables2)
        self.rates = (rate(lr1), rate(lr2))
        self.tau = torch.tensor(TAU_ONE, dtype=torch.int64, device=device)
        self.tau_rate = temperature_rate(temperature_lr)
        self.learn_temperature = self.tau_rate > 0
        self._step: dict | None = None

    def _tensor(self, values):
        return self.torch.as_tensor(np.asarray(values, np.int64), device=self.device)

    def rows(self, logits, step: StepInput):
        """Steps 1-4 (``logits``: an int64 tensor of the fed streams' rows, or anything
        numpy takes); a :class:`~nacrith.exact.device_rows.DeviceRows` of ``R`` and ``T``."""
        from ..exact.device_rows import DeviceRows

        torch, n, running = self.torch, self.n_vocab, step.running
        wanted = self._tensor(step.wanted)
        rows = self._tensor(step.c0).unsqueeze(1).repeat(1, n)
        w = model_p = None
        if len(step.wanted):
            if not isinstance(logits, torch.Tensor):
                logits = self._tensor(logits)
            logits = logits.to(device=self.device, dtype=torch.int64)
            score = (logits * self.tau) >> TAU_BITS
            if self.b1 is not None:
                score += self.b1[self._tensor(step.r1)] >> BIAS_SHIFT
            if self.b2 is not None:
                score += self.b2[self._tensor(step.r2)] >> BIAS_SHIFT
            distance = torch.clamp(score.max(dim=1, keepdim=True).values - score, max=DISTANCE_LIMIT)
            level = torch.clamp((distance * LEVEL_MULTIPLIER) >> 32, max=LEVEL_LIMIT)
            w = ((128 - level % 64) << 23) >> torch.clamp(level // 64, max=31)
            model_p = (w << PROB_BITS) // w.sum(dim=1, keepdim=True)
            rows.index_add_(0, wanted, (model_p * self._tensor(step.a).unsqueeze(1)) >> MIX_BITS)
        if len(step.tokens):
            stream_of = self._tensor(np.repeat(np.arange(running), np.diff(step.offsets)))
            rows.index_put_((stream_of, self._tensor(step.tokens)), self._tensor(step.values), accumulate=True)
        totals = rows.sum(dim=1)
        self._step = dict(input=step, wanted=wanted, logits=logits if len(step.wanted) else None, w=w, p=model_p, rows=rows, totals=totals)
        return DeviceRows(torch, rows, totals)

    def coded(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`NumpyHead.coded`: ``(R[x], T, P[x])`` of the fed streams, on the host."""
        torch, s = self.torch, self._step
        m = len(s["input"].wanted)
        if not m:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        x = self._tensor(symbols)[s["wanted"]]
        s["x"] = x
        fed = torch.arange(m, device=self.device)
        both = torch.stack((s["rows"][s["wanted"], x], s["totals"][s["wanted"]], s["p"][fed, x])).cpu().numpy()
        return both[0], both[1], both[2]

    def learn(self, symbols: np.ndarray) -> None:
        """Steps 5-7 (:meth:`NumpyHead.learn`)."""
        torch = self.torch
        s, self._step = self._step, None
        step = s["input"]
        m = len(step.wanted)
        if not m:
            return
        x = s.get("x")
        if x is None:
            x = self._tensor(symbols)[s["wanted"]]
        fed = torch.arange(m, device=self.device)
        gradients = (s["rows"][s["wanted"]] << GRAD_BITS) // s["totals"][s["wanted"]].unsqueeze(1)
        gradients[fed, x] -= 1 << GRAD_BITS
        squares = (gradients * gradients) >> GRAD_BITS
        for table, sums, rows, lr in _tables(self, step):
            rows_t = self._tensor(rows)
            touched = self._tensor(np.unique(rows))
            sums.index_add_(0, rows_t, squares)
            sums[touched] = torch.clamp(sums[touched], max=SQUARES_LIMIT)
            steps = (gradients * lr) // isqrt_torch(torch, (1 << GRAD_BITS) + sums[rows_t])
            table.index_add_(0, rows_t, -steps)
            table[touched] = torch.clamp(table[touched], -BIAS_LIMIT, BIAS_LIMIT)
        if self.learn_temperature:
            logits = s["logits"]
            distance = torch.clamp(logits.max(dim=1, keepdim=True).values - logits, max=TEMPERATURE_DISTANCE_LIMIT)
            weights = s["w"] >> 8
            expected = (weights * distance).sum(dim=1) // torch.clamp(weights.sum(dim=1), min=1)
            grad = (distance[fed, x] - expected).sum()
            self.tau = torch.clamp(self.tau - ((grad * self.tau_rate + (1 << 15)) >> 16), TAU_MIN, TAU_MAX)


def isqrt_torch(torch, values):
    """:func:`isqrt_numpy` as tensor operations."""
    root = torch.sqrt(values.to(torch.float64)).to(torch.int64)
    root -= (root * root > values).to(torch.int64)
    root += ((root + 1) * (root + 1) <= values).to(torch.int64)
    return root


class IntegerEnsemblePredictor(EnsemblePredictor):
    """The ensemble of a config with ``arithmetic="integer"`` (preset v5): v4's per-stream
    parts (n-gram, match, mixer weights, skip) on the host, the full-vocabulary rows, bias
    tables and temperature in a :class:`NumpyHead`, or a :class:`TorchHead` where the engine
    leaves its logits on a PyTorch device (the exact engine's PyTorch implementation).
    Its rows go to the int24 coder only (:class:`~nacrith.coder.WeightRows` or
    :class:`~nacrith.exact.device_rows.DeviceRows`)."""

    takes_device_logits = True  # the exact engine may leave its logits on its device

    def __init__(self, n_vocab: int, n_streams: int, config: EnsembleConfig, pieces: list[bytes] | None = None, threads: int = 1):
        if config.mix != "linear":
            raise ValueError("the integer ensemble mixes linearly")
        # what EnsemblePredictor's per-stream methods use, without its float tables and buffers
        self.config, self.n_vocab = config, n_vocab
        self._make_streams(n_streams)
        self.bias_classes = config.bias_classes
        self.token_class = token_classes(pieces, n_vocab) if config.bias and self.bias_classes > 1 else None
        self._class_tables = (1 if config.share else n_streams) * self.bias_classes if config.bias else 0
        self._context_tables = config.bias_hash if config.bias else 0  # what want_logits hashes the previous token into
        self._bias_row = np.zeros(n_streams, np.int64)
        self._context_row = np.zeros(n_streams, np.int64)
        self.head: NumpyHead | TorchHead | None = None
        self.skipped = self.steps = self._running = 0
        self._want: np.ndarray | None = None
        self._mix_sets: np.ndarray | None = None
        self._simplexes: np.ndarray | None = None

    def use_int24_rows(self, wanted: bool) -> None:
        if not wanted:
            raise ValueError("the integer ensemble codes with the int24 coder only")

    def _make_head(self, logits) -> None:
        config = self.config
        arguments = (self.n_vocab, self._class_tables, self._context_tables, config.bias_lr, config.context_bias_lr, config.temperature_lr)
        torch = getattr(logits, "torch", None)  # DeviceLogits: the engine's tensors and device
        if torch is not None:
            self.head = TorchHead(torch, logits.logits.device, *arguments)
        else:
            self.head = NumpyHead(*arguments)

    def probabilities(self, logits, running: int):
        want = self._want
        wanted = np.flatnonzero(want)
        if self.head is None:
            self._make_head(logits)
        if hasattr(logits, "logits"):  # DeviceLogits: the integers themselves
            logits = logits.logits if isinstance(self.head, TorchHead) else logits.logits.cpu().numpy()
        elif len(wanted):
            logits = self.head.integer_logits(logits) if isinstance(self.head, NumpyHead) else logits_to_integers(logits)
        states, simplexes = self._mixing_weights(wanted)
        fed_offsets, candidates, additions = self._candidate_additions(states, simplexes)
        additions = fixed(additions, PROB_BITS)
        c0 = np.zeros(running, np.int64)
        tokens, amounts = [], []  # each running stream's, in stream order
        for index, position in zip(range(running), np.cumsum(want) - 1):
            if want[index]:
                mine = slice(fed_offsets[position], fed_offsets[position + 1])
                tokens.append(candidates[mine])
                amounts.append(additions[mine])
            else:
                c0[index], skip_tokens, skip_amounts = self._skip_additions(self.streams[index])
                tokens.append(skip_tokens)
                amounts.append(skip_amounts)
        offsets = np.zeros(running + 1, np.int64)
        np.cumsum([len(part) for part in tokens], out=offsets[1:])
        step = StepInput(running, wanted, self._bias_row[wanted], self._context_row[wanted], fixed(simplexes[:, 0], MIX_BITS),
                         c0, offsets, np.concatenate(tokens), np.concatenate(amounts))
        self.steps += running
        self.skipped += running - len(wanted)
        return self.head.rows(logits, step)

    def _skip_additions(self, state: StreamState) -> tuple[int, np.ndarray, np.ndarray]:
        """A skipped stream's row as v4's :meth:`_skip_row` builds it, at 2^-30: (the constant
        everywhere, the candidates, their additions, the top candidate's with its confidence)."""
        confidence, everywhere, shares = self._skip_parts(state)
        shares = shares + (state.candidates == state.top) * confidence
        return int(fixed(np.array([everywhere]), PROB_BITS)[0]), state.candidates, fixed(shares, PROB_BITS)

    def update(self, symbols: np.ndarray) -> None:
        running = self._running
        learning = np.flatnonzero(self._want)
        if self.config.mixer and len(learning):  # v4's step, with the model's own P[x] / 2^30 from the head
            mixed, totals, model = self.head.coded(symbols)
            self._learn_linear_weights(learning, symbols, mixed, totals, model / float(1 << PROB_BITS))
        self.head.learn(symbols)
        self._follow(symbols, running)
