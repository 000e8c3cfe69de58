"""The language model's next-token distribution, computed identically on every CPU.

Softmax needs ``exp``, and numpy's vectorised ``exp`` differs in its last bits between
instruction sets (AVX2, AVX-512), which would make a file decodable only on the machine
family that wrote it. Here every step is an exactly rounded IEEE operation or integer
arithmetic, so the same logits give the same probabilities on any machine:

1. ``d = (max(row) - logit) * 64 * log2(e)`` in float32: the distance below the row's
   best token, in 1/64ths of a bit;
2. ``j = min(int(d), LIMIT)`` (NaN and overflow also land on LIMIT);
3. the float64 whose bit pattern is ``(1023 << 52) - (j << 46)``: that is ``2^(-j/64)``
   at every whole power of two and linear in between (Schraudolph's construction), within
   6 % of the true value everywhere.

The rows are not normalised (the range coder normalises). Against an exact softmax the
approximation costs about 0.0003 bits per token, measured on random logits.

Where nacrith's C kernel is built (``nacrith._kernels``, compiled at install when a C
compiler is present), it does the same steps in two passes per row instead of seven numpy
passes, with the same bits; the numpy code stays as the reference and the fallback.
"""
from __future__ import annotations

import math

import numpy as np

try:
    from .. import _kernels
except ImportError:  # built without a C compiler: the numpy path gives the same bits
    _kernels = None

STEPS_PER_BIT = 64
LIMIT = 1000 * STEPS_PER_BIT  # 2^-1000: far below the coder's 2^-24 floor, far above denormals
_SCALE = np.float32(STEPS_PER_BIT / math.log(2))
_ONE = np.int64(1023 << 52)
_LIMIT_F = np.float32(LIMIT)


class LogitTable:
    """Turns float32 logit rows into unnormalised float64 probability rows.

    Rows are processed a few at a time so that the intermediate arrays stay in the CPU's
    cache (at 256 streams the whole step is 50 MB per pass); ``threads`` > 1 spreads the
    chunks over a thread pool (numpy releases the GIL; every chunk's arithmetic is the
    same whoever runs it). The returned array is a buffer overwritten by the next call.
    """

    CHUNK_ROWS = 4

    def __init__(self, n_vocab: int, max_rows: int, threads: int = 1, use_kernel: bool | None = None):
        self.n_vocab = n_vocab
        # None: the C kernel where it is built; False forces the numpy reference (tests)
        self.use_kernel = _kernels is not None if use_kernel is None else use_kernel
        if self.use_kernel and _kernels is None:
            raise RuntimeError("nacrith's C kernel is not built (no C compiler at install?)")
        self._bits = np.empty((max_rows, n_vocab), np.int64)
        self._row_max = np.empty((max_rows, 1), np.float32)
        self.threads = max(1, threads)
        self._scratch = [self._new_scratch() for _ in range(self.threads)]
        self._pool = None
        self._weights = self._totals = None  # weight_rows' buffers, made on first use

    def _new_scratch(self):
        return np.empty((self.CHUNK_ROWS, self.n_vocab), np.float32), np.empty((self.CHUNK_ROWS, self.n_vocab), np.int32)

    def _levels_into(self, logits: np.ndarray, steps: np.ndarray, distance: np.ndarray, row_max: np.ndarray) -> None:
        np.max(logits, axis=1, keepdims=True, out=row_max)
        with np.errstate(over="ignore", invalid="ignore"):  # huge or infinite logits: inf and NaN, clamped below
            np.subtract(row_max, logits, out=distance)
            np.multiply(distance, _SCALE, out=distance)
        # NaN and anything from LIMIT up become LIMIT before the cast: casting them to int32
        # is platform-defined (INT_MIN on x86, saturation or 0 on ARM)
        np.fmin(distance, _LIMIT_F, out=distance)
        with np.errstate(invalid="ignore"):
            np.copyto(steps, distance, casting="unsafe")
        unsigned = steps.view(np.uint32)
        np.minimum(unsigned, np.uint32(LIMIT), out=unsigned)  # a negative distance cannot occur; if it did, LIMIT

    def log2_levels(self, logits: np.ndarray) -> np.ndarray:
        """Distance of each logit below its row maximum in 1/64 bits, clamped to LIMIT (int32)."""
        steps = np.empty(logits.shape, np.int32)
        self._levels_into(logits, steps, np.empty(logits.shape, np.float32), np.empty((len(logits), 1), np.float32))
        return steps

    def _chunk(self, logits: np.ndarray, start: int, worker: int) -> None:
        stop = min(start + self.CHUNK_ROWS, len(logits))
        if self.use_kernel:
            rows = np.ascontiguousarray(logits[start:stop], np.float32)
            _kernels.exp2_rows(rows, self._bits[start:stop], self.n_vocab, float(_SCALE))
            return
        distance, steps = self._scratch[worker]
        distance, steps = distance[: stop - start], steps[: stop - start]
        self._levels_into(logits[start:stop], steps, distance, self._row_max[start:stop])
        bits = self._bits[start:stop]
        np.left_shift(steps, 46, out=bits, dtype=np.int64)
        np.subtract(_ONE, bits, out=bits)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Unnormalised float64 probabilities, one row per row of ``logits``."""
        self._run_chunks(len(logits), lambda start, worker: self._chunk(logits, start, worker))
        return self._bits[: len(logits)].view(np.float64)

    def weight_rows(self, logits: np.ndarray):
        """The int24 coder's :class:`~nacrith.coder.WeightRows` of :meth:`probabilities`' rows,
        straight from the logits (C kernel only): the same integers the coder would compute
        from the float64 rows, without those rows."""
        from ..coder import WeightRows

        if not self.use_kernel:
            raise RuntimeError("weight_rows needs nacrith's C kernel")
        logits = np.ascontiguousarray(logits, np.float32)
        n = len(logits)
        if self._weights is None:  # sized for max_rows, like the float64 rows
            self._weights = np.empty((len(self._bits), self.n_vocab), np.uint32)
            self._totals = np.empty(len(self._bits), np.uint64)
        weights, totals = self._weights[:n], self._totals[:n]

        def chunk(start: int, worker: int) -> None:
            stop = min(start + self.CHUNK_ROWS, n)
            _kernels.exp2_weight_rows(logits[start:stop], weights[start:stop], totals[start:stop], self.n_vocab, float(_SCALE))

        self._run_chunks(n, chunk)
        return WeightRows(weights, totals)

    def biased_probabilities(self, logits: np.ndarray, temperature: float, table_a: np.ndarray | None, rows_a: np.ndarray,
                             table_b: np.ndarray | None, rows_b: np.ndarray, totals: np.ndarray | None = None,
                             dots: np.ndarray | None = None) -> np.ndarray:
        """:meth:`probabilities` of ``((logits * temperature) + table_a[rows_a]) + table_b[rows_b]``.

        Each operation is rounded to float32 in that order, as the ensemble's numpy code
        does before calling :meth:`probabilities`; a table of None adds nothing. Needs the C
        kernel (``use_kernel``), which does it all in one pass per row. Given float64
        arrays of one value per row, ``totals`` receives ``rows.sum(axis=1)`` and ``dots``
        ``(rows * logits).sum(axis=1)`` of the result, the same bits as numpy's (its
        pairwise order), taken while each row is still in the cache.
        """
        if not self.use_kernel:
            raise RuntimeError("biased_probabilities needs nacrith's C kernel")
        logits = np.ascontiguousarray(logits, np.float32)
        rows_a, rows_b = (np.ascontiguousarray(rows if rows is not None else (), np.int64) for rows in (rows_a, rows_b))
        scale, temperature = float(_SCALE), float(np.float32(temperature))

        def chunk(start: int, worker: int) -> None:
            stop = min(start + self.CHUNK_ROWS, len(logits))
            scratch = self._scratch[worker][0][0]  # one float32 row of this worker's scratch
            _kernels.scores_exp2_rows(logits[start:stop], self._bits[start:stop], scratch, self.n_vocab, scale, temperature,
                                      table_a, rows_a[start:stop], table_b, rows_b[start:stop],
                                      None if totals is None else totals[start:stop], None if dots is None else dots[start:stop])

        self._run_chunks(len(logits), chunk)
        return self._bits[: len(logits)].view(np.float64)

    def _run_chunks(self, n_rows: int, chunk) -> None:
        """``chunk(start, worker)`` for every CHUNK_ROWS rows, over the thread pool if threads > 1."""
        starts = range(0, n_rows, self.CHUNK_ROWS)
        if self.threads == 1 or len(starts) < 2:
            for start in starts:
                chunk(start, 0)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads)
        groups = [list(starts)[i:: self.threads] for i in range(self.threads)]
        list(self._pool.map(lambda worker: [chunk(start, worker) for start in groups[worker]], range(self.threads)))


class LLMPredictor:
    """The model alone: every stream uses its logits at every step."""

    settings = {"llm": "exp2-q64"}
    # takes a step's logits as the exact engine's device rows (nacrith.exact.device_rows),
    # which the int24 coder codes on the device with the same integers as these rows
    takes_device_logits = True

    def __init__(self, n_vocab: int, n_streams: int, threads: int = 1):
        self.table = LogitTable(n_vocab, n_streams, threads)
        self.weight_rows = False

    def use_int24_rows(self, wanted: bool) -> None:
        """Hand the coder int24 weight rows (when the coder is int24 and the C kernel is
        built) instead of float64 rows: the same coded bytes, less work."""
        self.weight_rows = wanted and self.table.use_kernel

    def want_logits(self, running: int):
        return None

    def probabilities(self, logits: np.ndarray, running: int):
        from ..coder import CodedRows

        if isinstance(logits, CodedRows):  # the exact engine's logits on its device
            return logits
        if self.weight_rows:
            return self.table.weight_rows(logits)
        return self.table.probabilities(logits)

    def update(self, symbols: np.ndarray) -> None:
        pass
