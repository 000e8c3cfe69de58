"""The online ensemble: language model + bias head + token n-gram + match model, mixed.

For stream ``s`` the model's logits first get the adaptive log-space **bias head**: one
value per vocabulary token (a separate table after tokens ending a line, ending with a
space, or else), moved after each token by ``-lr * (p - onehot(token))``, the gradient of
the code length. By default all streams of a block share it (they are parallel cursors
through the same document), which measured far better than one per stream.

Two further parts, added in preset v2 (off in v1; together 0.3-1.1% fewer bits than v1 on
every file replayed, docs/benchmarks.md): ``temperature_lr`` learns one shared scale ``T`` of
the model's logits (``T * logits + bias``) by the gradient ``E_q[logit] - logit(token)`` of
the model's own code length, and ``bias_hash`` adds a second bias table chosen by a hash of
the previous token (``bias_hash`` tables of the vocabulary's size), moved by the same step.

Preset v4 (the default) moves both tables by **AdaGrad** steps instead (``bias_rule``):
each entry keeps the sum of its squared gradients ``G`` and moves by ``-lr * g / sqrt(eps +
G)``, so a token's bias moves fast while it is rare in the text and settles once it is
frequent, with separate rates for the two tables (``bias_lr``, ``context_bias_lr``).
Replaying stored logits, that coded alice29 and asyoulik in 0.7% and 0.6% fewer bits than
v3's fixed rate (docs/benchmarks.md, "Ensemble ablation").

The **mixer** then combines that distribution with the cheap predictors. Linear mixing
(the default, as in the Nacrith paper)::

    p(t) = s_llm * p_llm(t) + sum_k s_k * n_k(t) / N_k + s_match * [t == match]

with ``s = softmax(w)``; ``n_k(t)`` counts how often ``t`` followed the current order-``k``
context (the **token n-gram**, orders 1..max_order) and ``match`` is the **match model**'s
prediction. Geometric mixing (``mix="geometric"``) adds ``w_k * ln(1 + n_k(t))`` and
``w_match * [t == match]`` to the logits instead. The weights ``w`` come from one of
several sets, chosen by the highest n-gram order whose context was seen and by the match
length, and learn online by one gradient step of the code length after each token. Both
terms are zero outside a few candidate tokens, so they cost almost nothing.

**Confidence skip**: when, from this stream's past alone, the top cheap candidate (highest
n-gram order, or the match model) has been right often enough at its confidence level,
the stream does not ask for logits this step (its token still enters the KV cache in the
same batch). Its distribution is then built from the cheap candidates alone.

Everything is computed in the same order on both sides, with float32 full-vocabulary
arithmetic, float64 scalars and no BLAS calls, so compression and decompression agree bit
for bit; since preset v3 the mixer's softmax uses :func:`portable_exp` instead of numpy's
``exp`` (whose last bits depend on the CPU's vector instructions), so they agree across
machines too.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ..coder import CodedRows
from .llm import _SCALE, LogitTable, _kernels
from .match import MatchIndex, MatchState
from .ngram import NGramTables

MATCH_BUCKETS = (1, 4, 16)  # match length bounds
N_MATCH_BUCKETS = len(MATCH_BUCKETS) + 2  # no match, then lengths 0, 1-3, 4-15, 16+
PARTS = ("ngram", "match", "bias", "mixer", "skip")  # the parts a config switches (--no-PART)

# e**x from exactly rounded IEEE operations alone (multiply, add, floor, ldexp), so every
# machine computes the same bits. numpy's float64 exp does not: its AVX-512 code and the
# code other x86 CPUs run differ in the last bit of about 5% of results (measured with
# NPY_DISABLE_CPU_FEATURES), and libm's exp picks an FMA variant at run time.
_LOG2_E = 1.4426950408889634  # log2(e), rounded to float64
# 2**f = sum_k (f ln 2)^k / k! for 0 <= f < 1: the coefficients (ln 2)^k / k!, rounded to
# float64 (from a 60-digit ln 2); the first omitted term is below 1e-13 of the sum
_EXP2_COEFFICIENTS = (1.0, 0.6931471805599453, 0.24022650695910072, 0.05550410866482158, 0.009618129107628477,
                      0.0013333558146428443, 0.0001540353039338161, 1.5252733804059841e-05, 1.321548679014431e-06,
                      1.01780860092397e-07, 7.054911620801123e-09, 4.4455382718708116e-10, 2.5678435993488206e-11,
                      1.3691488853904128e-12)


def portable_exp_array(x: np.ndarray) -> np.ndarray:
    """``e**x`` of every element of a float64 array where ``x <= 0`` (relative error below
    1e-12), with the same bits on every machine: exactly rounded IEEE operations alone
    (numpy's multiply, add, floor and ldexp), element by element."""
    x = np.asarray(x, np.float64)
    out = np.where(x != x, x, 0.0)  # NaN stays NaN; below the smallest float64 (and -inf): 0
    inside = x > -746.0
    t = x[inside] * _LOG2_E
    whole = np.floor(t)
    fraction = t - whole  # exact
    value = np.zeros_like(t)
    for coefficient in reversed(_EXP2_COEFFICIENTS):  # Horner: one multiply and one add per term
        value = value * fraction + coefficient
    out[inside] = np.ldexp(value, whole.astype(np.int32))
    return out


def portable_exp(x: float) -> float:
    """:func:`portable_exp_array` of one value."""
    return float(portable_exp_array(np.array([x], np.float64))[0])


def row_sums(values: np.ndarray) -> np.ndarray:
    """Per row of a float64 matrix, the bits of ``row.sum()`` (numpy's pairwise order:
    one running sum below 8 values, else 8 interleaved partial sums combined as a tree, then
    the rest; rows of up to 128 values, as the mixer's), in a few array operations."""
    m, n = values.shape
    if n > 128:
        return np.array([row.sum() for row in values], np.float64)
    if n < 8:
        total = np.full(m, -0.0)
        for column in range(n):
            total = total + values[:, column]
        return total
    partial = values[:, :8].copy()
    end = n - n % 8
    for start in range(8, end, 8):
        partial += values[:, start:start + 8]
    total = ((partial[:, 0] + partial[:, 1]) + (partial[:, 2] + partial[:, 3])) + ((partial[:, 4] + partial[:, 5]) + (partial[:, 6] + partial[:, 7]))
    for column in range(end, n):
        total = total + values[:, column]
    return total


@dataclass(frozen=True)
class EnsembleConfig:
    """Which parts run, and their constants. Stored in the container's header.

    The defaults were tuned on alice29.txt and asyoulik.txt by replaying the model's logits
    through each candidate setting (see bench/ablation.py for the resulting table).
    """

    ngram: bool = True
    max_order: int = 6
    match: bool = True
    match_min: int = 6
    bias: bool = True
    bias_lr: float = 0.5  # the bias tables' learning rate (adagrad: before the per-entry scaling)
    bias_classes: int = 3  # separate bias after tokens ending in a newline, a space, or else
    mixer: bool = True
    mix: str = "linear"  # measured better than "geometric" on both tuning files
    mixer_lr: float = 0.1
    llm_weight_lr: float = 0.0  # geometric only: learning the model's weight (a temperature) did not pay
    ngram_weight: float = -3.0  # initial raw weight of each n-gram order (the model's is 1; softmax for linear)
    match_weight: float = -3.0  # initial raw weight of the match model
    skip: bool = True
    skip_confidence: float = 0.995
    skip_min_trials: int = 32
    share: bool = True  # one n-gram table, match index and bias head for all streams of a block
    temperature_lr: float = 1e-4  # linear mix: learn a shared scale of the model's logits (0: off)
    bias_hash: int = 256  # > 0: a second bias table per bucket of the previous token (hashed)
    mixer_exp: str = "portable"  # the mixer's softmax: "portable" (portable_exp) or "numpy" (np.exp: presets v1, v2)
    bias_rule: str = "adagrad"  # the bias tables' step: "adagrad" (per-entry rates) or "sgd" (presets v1-v3)
    context_bias_lr: float = 0.3  # the previous-token tables' learning rate (sgd presets: bias_lr)
    bias_eps: float = 1.0  # adagrad: step = lr * g / sqrt(bias_eps + sum of g^2 so far)
    arithmetic: str = "float"  # "integer" (preset v5): the full-vocabulary part in integers (nacrith.predictors.integer)

    @property
    def llm_only(self) -> bool:
        return not (self.ngram or self.match or self.bias)

    @property
    def parts(self) -> list[str]:
        """The names of the parts switched on, in :data:`PARTS` order."""
        return [part for part in PARTS if getattr(self, part)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EnsembleConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown predictor settings: {', '.join(sorted(unknown))}")
        config = cls(**values)
        for name, allowed in (("mix", ("linear", "geometric")), ("mixer_exp", ("portable", "numpy")), ("bias_rule", ("adagrad", "sgd")),
                              ("arithmetic", ("float", "integer"))):
            if getattr(config, name) not in allowed:  # a file from a newer nacrith, or a damaged header
                raise ValueError(f"unknown predictor setting {name}={getattr(config, name)!r}")
        if config.arithmetic == "integer" and (config.mix, config.bias_rule, config.bias_eps, config.mixer_exp) != ("linear", "adagrad", 1.0, "portable"):
            raise ValueError("the integer ensemble needs mix=linear, bias_rule=adagrad, bias_eps=1 and mixer_exp=portable")
        return config


# Frozen presets: containers name one and list only the fields that differ from it. Never
# change a preset once released; add a new one (and make it the default) instead.
PRESETS = {
    "v1": EnsembleConfig(
        ngram=True, max_order=6, match=True, match_min=6, bias=True, bias_lr=0.16, bias_classes=3, mixer=True,
        mix="linear", mixer_lr=0.1, llm_weight_lr=0.0, ngram_weight=-3.0, match_weight=-3.0, skip=True,
        skip_confidence=0.995, skip_min_trials=32, share=True, temperature_lr=0.0, bias_hash=0, mixer_exp="numpy",
        bias_rule="sgd", context_bias_lr=0.16, bias_eps=1.0,
    ),
    # v1 plus the learned temperature and the hashed previous-token bias: 0.3-1.1% fewer bits
    # than v1 on every file replayed (alice29, asyoulik, cp.html, fields.c, grammar.lsp, xargs.1)
    "v2": EnsembleConfig(
        ngram=True, max_order=6, match=True, match_min=6, bias=True, bias_lr=0.16, bias_classes=3, mixer=True,
        mix="linear", mixer_lr=0.1, llm_weight_lr=0.0, ngram_weight=-3.0, match_weight=-3.0, skip=True,
        skip_confidence=0.995, skip_min_trials=32, share=True, temperature_lr=1e-4, bias_hash=256, mixer_exp="numpy",
        bias_rule="sgd", context_bias_lr=0.16, bias_eps=1.0,
    ),
    # v2 with the mixer's softmax from portable_exp: its files decode on any machine (v1 and
    # v2 files need numpy's exp of the same CPU family: AVX-512 or not)
    "v3": EnsembleConfig(
        ngram=True, max_order=6, match=True, match_min=6, bias=True, bias_lr=0.16, bias_classes=3, mixer=True,
        mix="linear", mixer_lr=0.1, llm_weight_lr=0.0, ngram_weight=-3.0, match_weight=-3.0, skip=True,
        skip_confidence=0.995, skip_min_trials=32, share=True, temperature_lr=1e-4, bias_hash=256, mixer_exp="portable",
        bias_rule="sgd", context_bias_lr=0.16, bias_eps=1.0,
    ),
}
# v3 with AdaGrad steps for the bias tables (each entry's rate falls with the squares of its
# past gradients: rare tokens learn fast, frequent ones settle) and their own rates: 0.4-0.7%
# fewer bits than v3 on every file of the ablation but xargs.1 (equal)
PRESETS["v4"] = replace(PRESETS["v3"], bias_rule="adagrad", bias_lr=0.5, context_bias_lr=0.3, bias_eps=1.0)
# v4's parts with the full-vocabulary arithmetic (rows, bias tables, temperature) in integers,
# which a GPU computes as exactly as a CPU (nacrith.predictors.integer); bias_eps is 1 there
PRESETS["v5"] = replace(PRESETS["v4"], arithmetic="integer")
DEFAULT_PRESET = "v4"  # what EnsembleConfig() equals


def token_classes(pieces: list[bytes] | None, n_vocab: int) -> np.ndarray:
    """Per token: 0 when its piece ends a line, 1 when it ends with a space or tab, else 2.

    Read-only; the last answer is kept for the same ``pieces`` (a session's piece table,
    the same for every block), as the loop over the vocabulary takes 10-20 ms.
    """
    if pieces is not None and _classes_memo[0] is pieces and _classes_memo[1] == n_vocab:
        return _classes_memo[2]
    classes = np.full(n_vocab, 2, np.int64)
    for token, piece in enumerate(pieces or []):
        if piece.endswith(b"\n"):
            classes[token] = 0
        elif piece.endswith((b" ", b"\t")):
            classes[token] = 1
    classes.flags.writeable = False
    _classes_memo[:] = [pieces, n_vocab, classes]
    return classes


_classes_memo: list = [None, 0, None]  # pieces, n_vocab, token_classes' answer


class StreamState:
    """The cheap predictors and mixer weights of one stream."""

    def __init__(self, n_features: int, weights: np.ndarray, ngram: NGramTables | None, match: MatchIndex | None):
        self.history: list[int] = []
        self.ngram = ngram
        self.match = MatchState(match, self.history) if match is not None else None
        self.weights = weights  # raw mixer weights, one row per weight set (a view of the predictor's array)
        self.keys: list[int] | None = None  # the n-gram context keys of the history, while it is this long:
        self.keys_length = -1
        self.skip_hits: dict[int, list[int]] = {}  # confidence bucket -> [hits, trials]
        # this step's candidates and their features, filled by EnsemblePredictor._prepare
        self.columns: dict[int, list[float]] = {}  # candidate -> its features
        self.n_cheap = n_features - 1
        self._candidates: np.ndarray | None = None  # the same as arrays, made when first asked for
        self._features: np.ndarray | None = None
        self.weight_set = 0
        self.top = -1
        self.top_bucket = -1
        self.skip = False

    def set_columns(self, columns: dict[int, list[float]]) -> None:
        """This step's candidates and their features (candidate -> features)."""
        self.columns = columns
        self._candidates = self._features = None

    @property
    def candidates(self) -> np.ndarray:
        """This step's candidate tokens (int64), in ``columns``' order."""
        if self._candidates is None:
            self._candidates = np.fromiter(self.columns, np.int64, len(self.columns))
        return self._candidates

    @property
    def features(self) -> np.ndarray:
        """Each candidate's cheap features, one row per candidate (float64)."""
        if self._features is None:
            self._features = np.array(list(self.columns.values()), np.float64).reshape(len(self.columns), self.n_cheap)
        return self._features

    def context_keys(self) -> list[int]:
        """The n-gram tables' keys of the current history (computed once per step)."""
        if self.keys_length != len(self.history):
            self.keys, self.keys_length = self.ngram.keys(self.history), len(self.history)
        return self.keys

    def update(self, token: int) -> None:
        if self.ngram:
            self.ngram.update(self.history, token, self.context_keys())
        self.history.append(token)
        if self.match:
            self.match.update(token)


class EnsemblePredictor:
    """Ensemble predictions for the streams of one block (see the module docstring)."""

    PRODUCT_ROWS = 8  # rows per pass of the temperature's weighted sums (3 MiB of scratch)

    def __init__(self, n_vocab: int, n_streams: int, config: EnsembleConfig, pieces: list[bytes] | None = None, threads: int = 1):
        self.config = config
        self.n_vocab = n_vocab
        self.table = LogitTable(n_vocab, n_streams, threads)
        self._make_streams(n_streams)
        self.bias_classes = config.bias_classes
        tables = (1 if config.share else n_streams) * self.bias_classes
        self.bias = np.zeros((tables, n_vocab), np.float32) if config.bias else None
        self.context_bias = np.zeros((config.bias_hash, n_vocab), np.float32) if config.bias and config.bias_hash else None
        self._context_tables = len(self.context_bias) if self.context_bias is not None else 0  # previous-token tables
        # adagrad: each table entry's sum of squared gradients so far, beside the tables
        adagrad = config.bias_rule == "adagrad"
        self.bias_squares = np.zeros_like(self.bias) if adagrad and self.bias is not None else None
        self.context_squares = np.zeros_like(self.context_bias) if adagrad and self.context_bias is not None else None
        self._context_row = np.zeros(n_streams, np.int64)  # context bias table of each stream this step
        self.token_class = token_classes(pieces, n_vocab) if self.bias_classes > 1 else None
        self.temperature = 1.0  # the model's logit scale (learned with temperature_lr > 0)
        self._learn_temperature = config.mix == "linear" and config.temperature_lr > 0
        self._logits = None  # this step's model rows, for the temperature's gradient
        self._expected_logit: np.ndarray | None = None
        self._products: np.ndarray | None = None  # scratch rows for the temperature's E_q[logit]
        self._bias_row = np.zeros(n_streams, np.int64)  # bias table of each stream this step
        self._learn_llm_weight = config.mixer and config.mix == "geometric" and config.llm_weight_lr > 0
        # with the C kernel, linear mixing computes the model rows in one pass (geometric
        # mixing adds its evidence to the scores in between, so it keeps the numpy path)
        self._fused = self.table.use_kernel and config.mix == "linear"
        self._coded_rows = False  # use_int24_rows: hand the int24 coder a FusedStep per step
        self._skip_rows: np.ndarray | None = None  # the FusedStep's rows of streams that skip the model
        self._fused_step: "FusedStep | None" = None  # this step's, once coded
        self.scores = None if self._fused else np.empty((n_streams, n_vocab), np.float32)  # 50 MB at 256 streams
        self._step = None if self.table.use_kernel else np.empty(n_vocab, np.float32)  # one stream's bias step
        self.logits_seen = np.empty((n_streams, n_vocab), np.float32) if self._learn_llm_weight else None
        self._rows: np.ndarray | None = None
        self.skipped = 0  # stream steps that did without the model (statistics)
        self.steps = 0
        self._running = 0
        self._want: np.ndarray | None = None
        self._probabilities: np.ndarray | None = None
        self._totals: np.ndarray | None = None  # this step's row sums, where probabilities() took them
        # this step's weight set and mixing weights (softmax) of each model-fed stream, in
        # stream order (linear mixing: _linear_mix makes them, _learn_linear_weights uses them)
        self._mix_sets: np.ndarray | None = None
        self._simplexes: np.ndarray | None = None

    def _make_streams(self, n_streams: int) -> None:
        """The streams' cheap predictors (shared by all streams of the block with ``share``)
        and mixer weights, from ``self.config``."""
        config = self.config
        self.orders = config.max_order if config.ngram else 0
        self.n_features = 1 + self.orders + 1  # llm, orders, match
        self.n_sets = (self.orders + 1) * N_MATCH_BUCKETS
        # raw mixer weights of every stream and weight set, in one array so that a step's
        # softmaxes and learning steps run as array operations across the streams
        initial = [1.0] + [config.ngram_weight] * (self.n_features - 2) + [config.match_weight]
        self.weights = np.tile(np.array(initial, np.float64), (n_streams, self.n_sets, 1))
        self.streams = []
        ngram = match = None
        for index in range(n_streams):
            if ngram is None or not config.share:
                ngram = NGramTables(config.max_order) if config.ngram else None
                match = MatchIndex(config.match_min) if config.match else None
            self.streams.append(StreamState(self.n_features, self.weights[index], ngram, match))

    # --- step 1: cheap features, and which streams skip the model ---------------------

    def want_logits(self, running: int):
        self._running = running
        want = np.ones(running, np.int8)
        streams = self.streams[:running]
        last = np.fromiter((state.history[-1] if state.history else -1 for state in streams), np.int64, running)
        first_table = np.arange(running) if not self.config.share else np.zeros(running, np.int64)
        if self.token_class is not None:  # the class of the previous token (0 at the start)
            previous = np.where(last >= 0, self.token_class[np.maximum(last, 0)], 0)
            self._bias_row[:running] = first_table * self.bias_classes + previous
        else:
            self._bias_row[:running] = first_table
        if self._context_tables:  # Knuth's multiplicative hash of the previous token
            self._context_row[:running] = (last + 1) * 2654435761 % (1 << 32) % self._context_tables
        for index, state in enumerate(streams):
            self._prepare(state)
            if state.skip:
                want[index] = 0
        self._want = want
        return None if want.all() else want

    def _prepare(self, state: StreamState) -> None:
        """Collect candidates and features of the stream's next token."""
        columns: dict[int, list[float]] = {}
        n_cheap = self.n_features - 1
        highest = 0
        top, top_count, top_total = -1, 0, 0
        geometric = self.config.mix == "geometric"
        if state.ngram:
            top_followers = None  # the highest order's followers: its most frequent is the top candidate
            for order, followers in enumerate(state.ngram.contexts(state.history, state.context_keys()), start=1):
                if followers is None:
                    continue
                if followers.__class__ is int:  # one token, seen once
                    followers = {followers: 1}
                highest, top_followers = order, followers
                total = sum(followers.values())
                column = order - 1
                for token, count in followers.items():
                    row = columns.get(token)
                    if row is None:
                        row = columns[token] = [0.0] * n_cheap
                    # the n-gram's evidence: ln(1 + count) for geometric mixing, else its frequency
                    row[column] = math.log1p(count) if geometric else count / total
            if top_followers is not None:
                top = max(top_followers, key=top_followers.__getitem__)
                top_count, top_total = top_followers[top], total
        match_bucket = 0
        if state.match:
            predicted = state.match.predicted()
            if predicted >= 0:
                match_bucket = 1 + sum(state.match.length >= bound for bound in MATCH_BUCKETS)
                row = columns.get(predicted)
                if row is None:
                    row = columns[predicted] = [0.0] * n_cheap
                row[-1] = math.log1p(min(state.match.length, 64)) + 1.0 if geometric else 1.0
        state.weight_set = highest * N_MATCH_BUCKETS + match_bucket
        state.set_columns(columns)
        # confidence of the top cheap candidate, for the skip decision
        if match_bucket >= 2:
            state.top, state.top_bucket = state.match.predicted(), 100 + match_bucket
        elif top >= 0 and highest >= 2:
            state.top = top
            state.top_bucket = highest * 10 + min(9, int(10 * top_count / top_total)) if top_total >= 2 else -1
        else:
            state.top, state.top_bucket = -1, -1
        state.skip = self.config.skip and self._skip_probability(state) >= self.config.skip_confidence

    def _skip_probability(self, state: StreamState) -> float:
        """Estimated probability that the top cheap candidate is right (0 when unknown)."""
        if state.top_bucket < 0:
            return 0.0
        hits, trials = state.skip_hits.get(state.top_bucket, (0, 0))
        if trials < self.config.skip_min_trials:
            return 0.0
        return (hits + 0.5) / (trials + 1.0)

    # --- step 2: the distributions --------------------------------------------------------

    def use_int24_rows(self, wanted: bool) -> None:
        """Hand the int24 coder a :class:`FusedStep` per step instead of float64 rows (where
        the C kernel is built and the mix is linear): each stream's row is then made, mixed,
        coded and learned from while it is in the CPU's cache, with the same coded bytes."""
        self._coded_rows = wanted and self._fused

    def probabilities(self, logits: np.ndarray, running: int):
        """The step's rows for the first ``running`` streams: float64 rows (not normalised),
        or after :meth:`use_int24_rows` a :class:`FusedStep` only the int24 coder takes."""
        if self._coded_rows:
            return self._fused_step_of(logits, running)
        want = self._want
        wanted = np.flatnonzero(want)
        model_totals = expected_logit = None
        if self._fused:
            model_rows, model_totals, expected_logit = self._fused_model_rows(logits, wanted)
        else:
            scores = self.scores[: len(wanted)]  # row j belongs to stream wanted[j]
            self._model_scores(logits, wanted, scores)
            if self.config.mix == "geometric":
                for row, index in enumerate(wanted):
                    state = self.streams[index]
                    if len(state.candidates):
                        weights = np.asarray(state.weights[state.weight_set][1:], np.float64)
                        # explicit products and sums (no BLAS): the same bits on every machine
                        scores[row, state.candidates] += (state.features * weights).sum(axis=1).astype(np.float32)
            model_rows = self.table.probabilities(scores)
        if model_totals is None and self.config.mix == "linear":
            # row by row, pairwise: the same bits as row.sum(); the temperature and the mix need them
            model_totals = model_rows.sum(axis=1)
        if self._learn_temperature:  # E_q[logit] under the model's own rows, before mixing
            self._logits = logits
            if expected_logit is None:
                expected_logit = self._weighted_sums(model_rows, logits)
            self._expected_logit = expected_logit / model_totals
        if len(wanted) == running:
            probabilities = model_rows
        else:  # some streams skipped the model: assemble the full set of rows
            if self._rows is None:
                self._rows = np.empty((len(self.streams), self.n_vocab), np.float64)
            probabilities = self._rows[:running]
            probabilities[wanted] = model_rows
            for index in np.flatnonzero(want == 0):
                self._skip_row(self.streams[index], probabilities[index])
        self._totals = None  # update() sums the rows itself unless the mix took their sums
        if self.config.mix == "linear":
            mixed_totals = self._linear_mix(probabilities, wanted, model_totals)
            if mixed_totals is not None and len(wanted) < running:  # the skipped rows' sums beside them
                skipped = np.flatnonzero(want == 0)
                totals = np.empty(running, np.float64)
                totals[wanted], totals[skipped] = mixed_totals, probabilities[skipped].sum(axis=1)
                mixed_totals = totals
            self._totals = mixed_totals
        self._probabilities = probabilities
        self.steps += running
        self.skipped += running - len(wanted)
        return probabilities

    def _fused_model_rows(self, logits: np.ndarray, rows: np.ndarray):
        """:meth:`_model_scores`, the probability table, the rows' sums and (when the
        temperature learns) :meth:`_weighted_sums` in one C pass per row (same bits):
        ``(rows, totals, weighted sums or None)``."""
        temperature = self._applied_temperature()
        totals = np.empty(len(rows), np.float64)
        dots = np.empty(len(rows), np.float64) if self._learn_temperature else None
        # one shared bias table means every _bias_row is 0 (the numpy path broadcasts it instead)
        model_rows = self.table.biased_probabilities(logits, temperature, self.context_bias, self._context_row[rows], self.bias,
                                                     self._bias_row[rows], totals, dots)
        return model_rows, totals, dots

    def _applied_temperature(self) -> float:
        """The scale the kernel applies to the logits, as float32 (1 when it does not learn: x * 1 == x)."""
        return float(np.float32(self.temperature if self._learn_temperature else 1.0))

    def _fused_step_of(self, logits: np.ndarray, running: int) -> "FusedStep":
        """What :meth:`probabilities` and :meth:`_linear_mix` prepare before the rows exist
        (the skipped streams' rows, each mixed stream's weights and candidate additions), for
        the C kernel that does the rest stream by stream (:class:`FusedStep`)."""
        want = self._want
        wanted = np.flatnonzero(want)
        skipped = np.flatnonzero(want == 0)
        if len(skipped) and (self._skip_rows is None or len(self._skip_rows) < len(skipped)):
            self._skip_rows = np.empty((len(skipped), self.n_vocab), np.float64)  # grown as needed
        skip_rows = self._skip_rows[: len(skipped)] if len(skipped) else np.empty((0, self.n_vocab))
        for row, index in zip(skip_rows, skipped):
            self._skip_row(self.streams[index], row)
        states, simplexes = self._mixing_weights(wanted)
        offsets, candidates, additions = self._candidate_additions(states, simplexes)
        self._logits = logits
        self.steps += running
        self.skipped += len(skipped)
        self._fused_step = None
        return FusedStep(self, np.ascontiguousarray(logits, np.float32), wanted, skip_rows, np.ascontiguousarray(simplexes[:, 0]),
                         offsets, candidates, additions)

    def _model_scores(self, logits: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """``out = w_llm * logits + bias`` for the given stream rows."""
        if self._learn_llm_weight:  # otherwise the model's weight stays at its initial 1
            self.logits_seen[rows] = logits
            scale = np.array([self.streams[i].weights[self.streams[i].weight_set][0] for i in rows], np.float32)
            np.multiply(logits, scale[:, None], out=out)
        elif self._learn_temperature:
            np.multiply(logits, np.float32(self.temperature), out=out)
        else:
            np.copyto(out, logits)
        if self.bias is None:
            return
        if self.context_bias is not None:
            for row, table in enumerate(self._context_row[rows]):
                np.add(out[row], self.context_bias[table], out=out[row])
        if len(self.bias) == 1:
            np.add(out, self.bias, out=out)
            return
        for row, table in enumerate(self._bias_row[rows]):  # row by row: no 50 MB gather at 256 streams
            np.add(out[row], self.bias[table], out=out[row])

    def _weighted_sums(self, probabilities: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """``sum(probabilities[r] * logits[r])`` per row, a few rows at a time into one buffer."""
        if self._products is None:
            self._products = np.empty((self.PRODUCT_ROWS, self.n_vocab), np.float64)
        sums = np.empty(len(probabilities), np.float64)
        for start in range(0, len(probabilities), self.PRODUCT_ROWS):
            stop = min(start + self.PRODUCT_ROWS, len(probabilities))
            products = self._products[: stop - start]
            np.multiply(probabilities[start:stop], logits[start:stop], out=products)
            products.sum(axis=1, out=sums[start:stop])
        return sums

    def _linear_mix(self, probabilities: np.ndarray, rows: np.ndarray, totals: np.ndarray) -> np.ndarray | None:
        """Replace model rows by ``w_llm * p_llm + sum w_i * q_i`` (unnormalised by a common factor).

        ``totals[j]`` is the sum of the model row of stream ``rows[j]``. With the C kernel,
        returns the mixed rows' sums (what :meth:`update` needs, the same bits as
        ``row.sum()``), taken in the same pass; else None.
        """
        mixed_totals = np.empty(len(rows), np.float64) if self.table.use_kernel else None
        states, simplexes = self._mixing_weights(rows)
        offsets, candidates, additions = self._candidate_additions(states, simplexes)
        for position, index in enumerate(rows):
            row = probabilities[index]
            factor = simplexes[position, 0] / totals[position]
            mine = slice(offsets[position], offsets[position + 1])
            if mixed_totals is not None:
                mixed_totals[position] = _kernels.scale_add_sum(row, factor, candidates[mine], additions[mine])
                continue
            row *= factor
            row[candidates[mine]] += additions[mine]
        return mixed_totals

    def _mixing_weights(self, rows: np.ndarray) -> tuple[list[StreamState], np.ndarray]:
        """The states of the streams ``rows`` and their mixing weights this step (the softmax of
        each one's current weight set), kept for the learning step as ``_mix_sets`` and
        ``_simplexes``."""
        states = [self.streams[index] for index in rows]
        sets = self._mix_sets = np.fromiter((state.weight_set for state in states), np.int64, len(states))
        self._simplexes = self._softmax_rows(self.weights[rows, sets])
        return states, self._simplexes

    def _candidate_additions(self, states: list[StreamState], simplexes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the cheap predictors add to the candidates of the streams ``states`` (mixing
        weights ``simplexes``): ``sum_i w_i * q_i`` per candidate, for all of them in one array
        operation (per row the same products and row sum as one stream at a time). Returns
        (offsets, candidates, additions): stream j's are ``[offsets[j]:offsets[j + 1]]``."""
        counts = [len(state.columns) for state in states]
        offsets = np.zeros(len(states) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        candidates = np.fromiter(itertools.chain.from_iterable(state.columns for state in states), np.int64, int(offsets[-1]))
        features = np.array([row for state in states for row in state.columns.values()], np.float64).reshape(len(candidates), self.n_features - 1)
        return offsets, candidates, (features * np.repeat(simplexes[:, 1:], counts, axis=0)).sum(axis=1)

    def _softmax_rows(self, raw: np.ndarray) -> np.ndarray:
        """Mixing weights on the simplex (softmax of each row of raw weights)."""
        if self.config.mixer_exp == "numpy":  # presets v1, v2: row by row, as they were made
            simplexes = np.empty_like(raw)
            for position, values in enumerate(raw):
                values = np.exp(values - values.max())
                simplexes[position] = values / values.sum()
            return simplexes
        values = portable_exp_array(raw - raw.max(axis=1, keepdims=True))
        return values / row_sums(values)[:, None]

    def _skip_parts(self, state: StreamState) -> tuple[float, float, np.ndarray]:
        """A skipped stream's distribution in parts: (the top candidate's confidence, what
        every token gets, what each candidate gets besides): half of the rest spread evenly,
        half over the candidates by their features."""
        confidence = self._skip_probability(state)
        rest = 1.0 - confidence
        shares = np.zeros(0)
        if len(state.candidates):
            weight = state.features.sum(axis=1) + 1e-3
            shares = 0.5 * rest * weight / weight.sum()
        return confidence, 0.5 * rest / self.n_vocab, shares

    def _skip_row(self, state: StreamState, row: np.ndarray) -> None:
        """A skipped stream's distribution: the top candidate, then other candidates, then anything."""
        confidence, everywhere, shares = self._skip_parts(state)
        row.fill(everywhere)
        if len(state.candidates):
            row[state.candidates] += shares
        row[state.top] += confidence

    # --- step 3: learning from the coded symbols ----------------------------------------

    def update(self, symbols: np.ndarray) -> None:
        running = self._running
        learning = np.flatnonzero(self._want)
        fused = self._fused_step if self._coded_rows else None
        if self._coded_rows and fused is None:
            raise RuntimeError("update() before the step's FusedStep was coded")
        if fused is not None:  # the kernel took the bias steps; the mixer learns from its outputs
            self._fused_step = None
            if self.config.mixer and len(learning):
                self._learn_linear_weights(learning, symbols, fused.p_token, fused.mixed_totals)
        else:
            probabilities = self._probabilities
            totals = probabilities.sum(axis=1) if self._totals is None else self._totals
            if self.config.mixer and len(learning):
                self._learn_weights(learning, symbols, probabilities, totals)
            if self.bias is not None and len(learning):
                self._learn_bias(learning, symbols, probabilities, totals)
        if self._learn_temperature and len(learning):
            # d(-ln q(x))/dT = E_q[logit] - logit(x), q the model's own distribution
            for row, index in enumerate(learning):
                gradient = self._expected_logit[row] - float(self._logits[row, int(symbols[index])])
                self.temperature -= self.config.temperature_lr * gradient
        self._follow(symbols, running)

    def _follow(self, symbols: np.ndarray, running: int) -> None:
        """Each running stream's skip statistics and cheap predictors take its coded token."""
        for index in range(running):
            state = self.streams[index]
            token = int(symbols[index])
            if state.top_bucket >= 0:
                counts = state.skip_hits.setdefault(state.top_bucket, [0, 0])
                counts[0] += state.top == token
                counts[1] += 1
            state.update(token)

    def _learn_weights(self, rows: np.ndarray, symbols: np.ndarray, probabilities: np.ndarray, totals: np.ndarray) -> None:
        if self.config.mix == "linear":
            tokens = symbols[rows].astype(np.int64)
            self._learn_linear_weights(rows, symbols, probabilities[rows, tokens], totals[rows])
            return
        lr = self.config.mixer_lr
        if self._learn_llm_weight:  # expected logit under p, for the gradient of w_llm
            expected_logit = (probabilities[rows] * self.logits_seen[rows]).sum(axis=1) / totals[rows]
        for position, index in enumerate(rows):
            state = self.streams[index]
            weights = state.weights[state.weight_set]  # a view: updated in place
            token = int(symbols[index])
            hit = np.flatnonzero(state.candidates == token)
            observed = state.features[hit[0]] if len(hit) else np.zeros(self.n_features - 1)
            # d(-ln p(x))/dw_i = E_p[f_i] - f_i(x)
            p_candidates = probabilities[index, state.candidates] / totals[index]
            expected = (p_candidates[:, None] * state.features).sum(axis=0) if len(state.candidates) else np.zeros(self.n_features - 1)
            if self._learn_llm_weight:
                weights[0] -= self.config.llm_weight_lr * float(expected_logit[position] - self.logits_seen[index, token])
            for i in range(1, self.n_features):
                weights[i] -= lr * float(expected[i - 1] - observed[i - 1])

    def _learn_linear_weights(self, rows: np.ndarray, symbols: np.ndarray, mixed: np.ndarray, totals: np.ndarray,
                              model_share: np.ndarray | None = None) -> None:
        """One gradient step of the code length on each learning stream's weight set.

        ``p(x) = sum_i s_i q_i(x)`` with ``s = softmax(w)``, so ``d(-ln p(x))/dw_i = s_i (1 -
        q_i(x) / p(x))``; ``q_0(x)``, the model's own share, is recovered from the mixed row
        by subtracting the cheap predictors' part. All streams at once, element by element
        the same IEEE operations as one stream at a time. ``rows`` are the streams the model
        fed this step, those :meth:`_linear_mix` mixed, in the same order; ``mixed`` and
        ``totals`` their mixed rows' entries at their tokens and their sums; ``model_share``,
        where given, the model's own probability of each token, instead of recovering it.
        """
        states = [self.streams[index] for index in rows]
        tokens = symbols[rows].astype(np.int64)
        observed = np.zeros((len(rows), self.n_features - 1))  # each token's cheap features (0: not a candidate)
        for position, (state, token) in enumerate(zip(states, tokens.tolist())):
            features = state.columns.get(token)
            if features is not None:
                observed[position] = features
        simplexes, sets = self._simplexes, self._mix_sets  # this step's, from _linear_mix
        llm_share = (mixed - row_sums(observed * simplexes[:, 1:])) / simplexes[:, 0] if model_share is None else model_share
        shares = np.concatenate((llm_share[:, None], observed), axis=1)
        p_token = np.maximum(mixed / totals, 1e-300)
        step = simplexes * (1.0 - shares / p_token[:, None])
        self.weights[rows, sets] = self.weights[rows, sets] - self.config.mixer_lr * step

    def _learn_bias(self, rows: np.ndarray, symbols: np.ndarray, probabilities: np.ndarray, totals: np.ndarray) -> None:
        """One gradient step of the code length per learning stream on both bias tables.

        The gradient is ``g = p - onehot(token)`` (``p`` the mixed row, normalised, rounded to
        float32). "sgd" (presets v1-v3): ``table -= lr * g``. "adagrad": ``squares += g * g``,
        then ``table -= (lr * g) / sqrt(bias_eps + squares)``, all in float32, entry by entry.
        Applied stream by stream in stream order (streams may share a table), so the
        arithmetic is the same on both sides and no step-sized temporary is needed.
        """
        config = self.config
        if self.table.use_kernel:  # the same steps in one C pass per stream
            _kernels.learn_bias(probabilities, self.n_vocab, np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(totals, np.float64),
                                np.ascontiguousarray(symbols, np.int64), config.bias_lr, self.bias, self._bias_row,
                                self.context_bias, self._context_row, config.context_bias_lr, config.bias_eps,
                                self.bias_squares, self.context_squares)
            return
        tables = [(self.bias, self._bias_row, self.bias_squares, config.bias_lr)]
        if self.context_bias is not None:  # the same gradient: both tables add to the scores
            tables.append((self.context_bias, self._context_row, self.context_squares, config.context_bias_lr))
        step = self._step
        for index in rows:
            token = symbols[index]
            for table, table_rows, squares, lr in tables:
                entries = table[table_rows[index]]
                if squares is None:  # sgd: lr * p rounded to float32 and subtracted, then + lr at the token
                    np.multiply(probabilities[index], lr / totals[index], out=step, casting="unsafe")
                    np.subtract(entries, step, out=entries)
                    entries[token] += np.float32(lr)
                    continue
                np.multiply(probabilities[index], 1.0 / totals[index], out=step, casting="unsafe")  # g, float32
                step[token] -= np.float32(1.0)
                sums = squares[table_rows[index]]
                sums += step * step
                entries -= (np.float32(lr) * step) / np.sqrt(np.float32(config.bias_eps) + sums)


class FusedStep(CodedRows):
    """One step of an :class:`EnsemblePredictor` in linear mode, coded by the int24 coder
    through the C kernel ``ensemble_int24``: stream by stream, the model row is made from
    the logits and the bias tables as they were when the step began, summed, mixed with the
    stream's candidates, quantised and coded, and the bias tables take the stream's step,
    while the row is in the CPU's cache. The same arithmetic in the same order as the
    predictor's float64 rows, the coder and :meth:`EnsemblePredictor.update` (so the same
    bytes), without a step's worth of float64 rows (100 MB at 256 streams) passing through
    memory four times. Holds what :meth:`EnsemblePredictor.update` then learns from."""

    def __init__(self, predictor: EnsemblePredictor, logits, wanted, skip_rows, weight0, offsets, candidates, additions):
        self.predictor = predictor
        self.logits, self.wanted, self.skip_rows = logits, wanted, skip_rows
        self.mix = (weight0, offsets, candidates, additions)
        n = len(wanted)
        self.model_totals, self.mixed_totals, self.p_token = np.empty(n), np.empty(n), np.empty(n)
        self.dots = np.empty(n) if predictor._learn_temperature else None

    def __len__(self) -> int:
        return self.predictor._running

    def int24_encode(self, symbols: np.ndarray, state: np.ndarray, out: np.ndarray) -> int:
        return self._run(True, np.ascontiguousarray(symbols, np.int32), state, out)

    def int24_decode(self, state: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
        return self._run(False, out, state, words)

    def _run(self, encode: bool, symbols: np.ndarray, state: np.ndarray, words: np.ndarray) -> int:
        p = self.predictor
        config = p.config
        if p._fused_step is not None:
            raise RuntimeError("a FusedStep is coded once")
        bias = (p.bias, p._bias_row, p.bias_squares, config.bias_lr, p.context_bias, p._context_row, p.context_squares,
                config.context_bias_lr, config.bias_eps)  # per table (table, rows, squares, rate), then eps: the values _learn_bias
        # passes to the learn_bias kernel, which takes them in its older order (rates, tables and rows, eps, squares)
        result = _kernels.ensemble_int24(encode, self.logits, np.ascontiguousarray(self.wanted, np.int64), self.skip_rows, symbols,
                                         p.n_vocab, float(_SCALE), p._applied_temperature(), bias, self.mix,
                                         (self.model_totals, self.dots, self.mixed_totals, self.p_token), state, words)
        if not encode and result < len(symbols):
            return result  # invalid data: the decoder reports it
        if p._learn_temperature:  # E_q[logit] under the model's own rows, for update()
            p._expected_logit = self.dots / self.model_totals
        p._fused_step = self
        return result
