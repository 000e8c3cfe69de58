"""The ensemble: every combination of parts round-trips, skip fires on repetitive text, and a
container records its parts so that decoding needs no flags."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from nacrith import container as fmt
from nacrith.lockstep import Lockstep, split_streams
from nacrith.predictors import EnsembleConfig, ensemble_config, make_predictor, predictor_settings
from nacrith.predictors.ensemble import PARTS

from .conftest import SMALL, pack, unpack

TEXT = (
    b"The Mock Turtle went on. 'We had the best of educations--in fact, we went to school every day--' "
    b"'I've been to a day-school, too,' said Alice; 'you needn't be so proud as all that.'\n"
)
REPETITIVE = b"for (i = 0; i < n; i++) { total += value[i]; }\n" * 24
EAGER_SKIP = dict(skip_min_trials=4, skip_confidence=0.8)  # lets skip fire within a short test


def code(session, data: bytes, config: EnsembleConfig, n_streams: int = 2):
    """Encode and decode ``data``'s tokens directly; returns (decoded tokens equal, encoder predictor)."""
    tokens = np.asarray(session.tokenizer.encode(data), np.int32)
    lengths = split_streams(len(tokens), n_streams)
    bounds = np.cumsum([0] + lengths)
    streams = [tokens[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
    settings = predictor_settings(config)
    results = []
    for _ in range(2):
        predictor = make_predictor(settings, session.llama.n_vocab, len(lengths), session.tokenizer.pieces)
        context = session.context(len(lengths), SMALL["ctx"])
        results.append((Lockstep(context, session.llama.bos, SMALL["ctx"], SMALL["slide"], predictor), predictor))
    coded = results[0][0].encode(streams)
    decoded = results[1][0].decode(coded, lengths)
    same = all(np.array_equal(a, b) for a, b in zip(streams, decoded))
    return same, results[0][1], len(coded)


@pytest.mark.slow
@pytest.mark.parametrize("switches", list(itertools.product([False, True], repeat=len(PARTS))), ids=lambda s: "".join("1" if x else "0" for x in s))
def test_every_combination_round_trips(session, switches):
    config = replace(EnsembleConfig(**EAGER_SKIP), **dict(zip(PARTS, switches)))
    same, _, _ = code(session, TEXT + REPETITIVE[:200], config)
    assert same


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["linear", "geometric"])
@pytest.mark.parametrize("share", [True, False])
def test_mixing_and_sharing_variants(session, mix, share):
    config = EnsembleConfig(mix=mix, share=share, llm_weight_lr=0.001 if mix == "geometric" else 0.0, **EAGER_SKIP)
    same, _, _ = code(session, TEXT + REPETITIVE[:300], config, n_streams=3)
    assert same


@pytest.mark.parametrize("extra", [dict(temperature_lr=1e-4), dict(bias_hash=16), dict(temperature_lr=1e-4, bias_hash=16, share=False)])
def test_temperature_and_context_bias_round_trip(session, extra):
    config = EnsembleConfig(**EAGER_SKIP, **extra)
    same, predictor, _ = code(session, TEXT + REPETITIVE[:300], config, n_streams=3)
    assert same
    if "temperature_lr" in extra:
        assert predictor.temperature != 1.0  # it learned
    if "bias_hash" in extra:
        assert np.count_nonzero(predictor.context_bias.any(axis=1)) > 1  # several buckets were used


@pytest.mark.slow
def test_skip_fires_on_repetitive_text(session):
    same, predictor, _ = code(session, REPETITIVE, EnsembleConfig(**EAGER_SKIP), n_streams=1)
    assert same
    assert predictor.skipped > 0.3 * predictor.steps


@pytest.mark.slow
def test_ensemble_helps_on_repetitive_text(session):
    _, _, llm_only = code(session, REPETITIVE, EnsembleConfig(ngram=False, match=False, bias=False, mixer=False, skip=False), n_streams=1)
    _, _, ensemble = code(session, REPETITIVE, EnsembleConfig(), n_streams=1)
    assert ensemble < llm_only


def test_container_records_parts_and_decodes_without_flags(session):
    config = EnsembleConfig(ngram=False, bias_lr=0.05, **EAGER_SKIP)
    blob = pack(session, TEXT * 3, fallback=False, ensemble=config, **SMALL)
    section = fmt.parse(blob).header.model
    assert ensemble_config(section.predictor) == config
    assert unpack(session, blob) == TEXT * 3


def test_llm_only_container(session):
    blob = pack(session, TEXT, fallback=False, ensemble=None, **SMALL)
    assert "ensemble" not in fmt.parse(blob).header.model.predictor
    assert unpack(session, blob) == TEXT


def test_presets_are_frozen():
    """Containers name a preset: its values must never change."""
    from nacrith.predictors.ensemble import PRESETS

    v1 = {
        "ngram": True, "max_order": 6, "match": True, "match_min": 6, "bias": True, "bias_lr": 0.16,
        "bias_classes": 3, "mixer": True, "mix": "linear", "mixer_lr": 0.1, "llm_weight_lr": 0.0,
        "ngram_weight": -3.0, "match_weight": -3.0, "skip": True, "skip_confidence": 0.995,
        "skip_min_trials": 32, "share": True,
        # fields added after v1 are off in it, so v1 files decode as they were made
        "temperature_lr": 0.0, "bias_hash": 0, "mixer_exp": "numpy",
        "bias_rule": "sgd", "context_bias_lr": 0.16, "bias_eps": 1.0, "arithmetic": "float",
    }
    assert PRESETS["v1"].to_dict() == v1
    v2 = {**v1, "temperature_lr": 1e-4, "bias_hash": 256}
    assert PRESETS["v2"].to_dict() == v2
    v3 = {**v2, "mixer_exp": "portable"}
    assert PRESETS["v3"].to_dict() == v3
    v4 = {**v3, "bias_rule": "adagrad", "bias_lr": 0.5, "context_bias_lr": 0.3}
    assert PRESETS["v4"].to_dict() == v4
    assert PRESETS["v5"].to_dict() == {**v4, "arithmetic": "integer"}
    assert predictor_settings(EnsembleConfig()) == {"llm": "exp2-q64", "ensemble": "v4"}
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v3"}) == PRESETS["v3"]
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v2"}) == PRESETS["v2"]  # old files keep np.exp
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v1"}) == PRESETS["v1"]  # old files
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v1", "set": {"skip": False}}).skip is False
    with pytest.raises(ValueError):
        ensemble_config({"llm": "exp2-q64", "ensemble": "v9"})
    for name in ("bias_rule", "mix", "mixer_exp"):  # a value this version does not know: refused, not guessed
        with pytest.raises(ValueError, match=name):
            ensemble_config({"llm": "exp2-q64", "ensemble": "v4", "set": {name: "newer"}})


def _replay(config: EnsembleConfig, use_kernel: bool, pieces, n_streams: int = 3, steps: int = 40, n_vocab: int = 300):
    """Rows, symbols and final bias tables of an ensemble fed random logits (no model needed)."""
    from nacrith.predictors import ensemble as ensemble_module

    saved = ensemble_module.LogitTable.__init__.__defaults__
    ensemble_module.LogitTable.__init__.__defaults__ = (1, use_kernel)  # threads, use_kernel
    try:
        predictor = ensemble_module.EnsemblePredictor(n_vocab, n_streams, config, pieces)
    finally:
        ensemble_module.LogitTable.__init__.__defaults__ = saved
    rng = np.random.default_rng(5)
    text = rng.integers(0, 40, size=(n_streams, steps))  # few distinct tokens: the n-gram and match fire
    rows = []
    for step in range(steps):
        running = n_streams - (step >= steps - 3)  # the last stream stops early
        want = predictor.want_logits(running)
        logits = (rng.normal(size=(running, n_vocab)) * 3).astype(np.float32)
        if step == steps - 1:
            logits[0, 7] = np.nan  # the kernel must degrade exactly as numpy does (last step: the
            # temperature learns from it and would turn every later row to NaN)
        if want is not None:
            logits = logits[want.astype(bool)]
        probabilities = predictor.probabilities(logits, running)
        rows.append(probabilities.copy())
        predictor.update(text[:running, step].astype(np.int32))
    tables = [t.copy() for t in (predictor.bias, predictor.context_bias) if t is not None]
    return rows, tables, predictor.temperature


@pytest.mark.parametrize("extra", [{}, {"share": False}, {"bias_hash": 0, "temperature_lr": 0.0}, {"bias_classes": 1}, {"bias": False},
                                   {"skip_min_trials": 2, "skip_confidence": 0.5}, {"bias_rule": "sgd"},
                                   {"bias_rule": "sgd", "bias_hash": 0}, {"bias_eps": 1e-30}])
def test_ensemble_kernels_match_numpy(extra):
    """The C kernels (scores + table in one pass, bias learning) give numpy's bits exactly."""
    from nacrith.predictors.llm import _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    pieces = [bytes([32 + t % 90]) + (b"\n" if t % 7 == 0 else b" " if t % 5 == 0 else b"") for t in range(300)]
    config = replace(EnsembleConfig(), **extra)
    with np.errstate(invalid="ignore"):
        numpy_rows, numpy_tables, numpy_temperature = _replay(config, False, pieces)
    kernel_rows, kernel_tables, kernel_temperature = _replay(config, True, pieces)
    assert all(a.view(np.int64).tolist() == b.view(np.int64).tolist() for a, b in zip(numpy_rows, kernel_rows))
    assert all(np.array_equal(a.view(np.int32), b.view(np.int32)) for a, b in zip(numpy_tables, kernel_tables))
    assert np.array_equal([numpy_temperature], [kernel_temperature], equal_nan=True)


def test_portable_exp():
    """portable_exp is e**x to within 1e-12 where the mixer uses it (x <= 0), exactly 1 at 0."""
    import math

    from nacrith.predictors.ensemble import portable_exp

    assert portable_exp(0.0) == 1.0
    for x in np.linspace(-700.0, 0.0, 100001).tolist() + [-1e-300, -5e-324]:
        assert abs(portable_exp(x) - math.exp(x)) <= 1e-12 * math.exp(x)
    assert portable_exp(-1e6) == portable_exp(-math.inf) == 0.0
    assert math.isnan(portable_exp(math.nan))


def _scalar_portable_exp(x: float) -> float:
    """portable_exp's rule written with Python floats, one value at a time (the reference)."""
    import math

    from nacrith.predictors.ensemble import _EXP2_COEFFICIENTS, _LOG2_E

    if not x > -746.0:
        return x if x != x else 0.0
    t = x * _LOG2_E
    whole = math.floor(t)
    fraction = t - whole
    value = 0.0
    for coefficient in reversed(_EXP2_COEFFICIENTS):
        value = value * fraction + coefficient
    return math.ldexp(value, whole)


def test_portable_exp_array_and_row_sums_give_the_scalar_bits():
    """The mixer's array forms: portable_exp_array is the scalar rule element by element,
    and row_sums is each row's own ``row.sum()``, bit for bit (rows of 1 to 140 values)."""
    import math

    from nacrith.predictors.ensemble import portable_exp, portable_exp_array, row_sums

    rng = np.random.default_rng(2)
    x = np.concatenate([-rng.exponential(5.0, 20000), -rng.uniform(0.0, 800.0, 2000),
                        [0.0, -0.0, -745.9, -746.0, -1e300, -math.inf, math.nan, -5e-324]])
    reference = np.array([_scalar_portable_exp(v) for v in x.tolist()])
    assert np.array_equal(portable_exp_array(x).view(np.int64), reference.view(np.int64))
    assert np.array_equal(np.array([portable_exp(v) for v in x.tolist()]).view(np.int64), reference.view(np.int64))
    for n in range(1, 141):
        values = rng.exponential(1.0, (50, n)) * rng.choice([1e-300, 1e-5, 1.0, 1e5], (50, n))
        assert np.array_equal(row_sums(values).view(np.int64), np.array([row.sum() for row in values]).view(np.int64)), n


def _ensemble_run(config: EnsembleConfig, coded_rows: bool = False, n_streams: int = 4, steps: int = 200, n_vocab: int = 300,
                  nan_at: int | None = None, code: bytes | None = None):
    """An ensemble run on random logits and a noisy repeated phrase (no model needed), coded
    by the int24 coder (or, given ``code``, decoded from it): (predictor, code, symbols).
    ``coded_rows``: hand the coder :class:`FusedStep` s instead of float64 rows; ``nan_at``:
    a NaN logit in stream 0 at that step."""
    from nacrith.coder import make_decoder, make_encoder
    from nacrith.predictors.ensemble import EnsemblePredictor

    rng = np.random.default_rng(11)
    pieces = [bytes([32 + t % 90]) + (b"\n" if t % 7 == 0 else b" " if t % 5 == 0 else b"") for t in range(n_vocab)]
    predictor = EnsemblePredictor(n_vocab, n_streams, config, pieces)
    predictor.use_int24_rows(coded_rows)
    encoder, decoder = (make_encoder("int24"), None) if code is None else (None, make_decoder(code, "int24"))
    phrase = rng.integers(0, 12, 9)
    coded = []
    for step in range(steps):
        running = n_streams - (step >= steps - 5)  # the last stream stops early
        want = predictor.want_logits(running)
        logits = (rng.normal(size=(running, n_vocab)) * 3).astype(np.float32)
        if step == nan_at:
            logits[0, 7] = np.nan
        if want is not None:
            logits = np.ascontiguousarray(logits[want.astype(bool)])
        rows = predictor.probabilities(logits, running)
        # the phrase 80% of the time: the n-gram, match model, mixer and skip all take part
        symbols = np.where(rng.random(running) < 0.8, phrase[(step + np.arange(running)) % 9], rng.integers(0, 40, running))
        if decoder is None:
            encoder.encode(symbols, rows)
        else:
            symbols = decoder.decode(rows)
        coded.append(symbols)
        predictor.update(symbols)
    return predictor, code if encoder is None else encoder.finish(), np.concatenate(coded)


def _coded_state(config: EnsembleConfig, coded_rows: bool = False):
    """A hash of the mixer weights, the bias table and the int24 code after :func:`_ensemble_run`,
    and its skip count."""
    import hashlib

    predictor, code, _ = _ensemble_run(config, coded_rows)
    weights = np.array([w for stream in predictor.streams for row in stream.weights for w in row])
    return hashlib.sha256(weights.tobytes() + predictor.bias.tobytes() + code).hexdigest()[:16], predictor.skipped


# what preset v3 (and variants) computed when released: a change of the ensemble's arithmetic
# that alters any bit fails here, before it could make released files undecodable
RELEASED_V3 = [
    ({}, "7203648b9d1058d8", 0),
    ({"share": False}, "329a932463ed0a74", 0),
    ({"mix": "geometric"}, "e0321faef5dfbf4d", 0),
    ({"ngram": False}, "f35f6e3072b9166a", 0),
    ({"skip_min_trials": 2, "skip_confidence": 0.5}, "2ed8366c31d77302", 311),
]


RELEASED_V4 = [
    ({}, "68a633ed71f9f177", 0),
    ({"share": False}, "cb8df55e7538560a", 0),
    ({"mix": "geometric"}, "2341ad65bfa4023e", 0),
    ({"bias_hash": 0}, "9764b0e0aec60a7d", 0),
    ({"skip_min_trials": 2, "skip_confidence": 0.5}, "9520e2af94cd6cff", 311),
]


@pytest.mark.parametrize("coded_rows", [False, True], ids=["rows", "fused"])
@pytest.mark.parametrize("preset, extra, digest, skipped", [("v3", *case) for case in RELEASED_V3] + [("v4", *case) for case in RELEASED_V4])
def test_ensemble_computes_what_it_computed_when_released(preset, extra, digest, skipped, coded_rows):
    """Each preset's state and code on a fixed input are pinned (v3's hashes were taken with
    the code that released it, before its per-stream loops became array operations; v4's
    when it was released), whether the coder gets float64 rows or the fused C step."""
    from nacrith.predictors.ensemble import PRESETS
    from nacrith.predictors.llm import _kernels

    if coded_rows and _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    assert _coded_state(replace(PRESETS[preset], **extra), coded_rows) == (digest, skipped)


@pytest.mark.parametrize("extra", [{}, {"share": False}, {"skip_min_trials": 2, "skip_confidence": 0.5}, {"bias": False},
                                   {"bias_hash": 0, "temperature_lr": 0.0}, {"bias_rule": "sgd"}, {"mixer": False}])
def test_fused_step_codes_the_rows_bytes_and_decodes(extra):
    """The fused C step (the int24 coder's path for linear mixing) codes the bytes float64
    rows give, learns the same state, and decodes its own code, with a NaN logit too."""
    from nacrith.predictors.llm import _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    config = replace(EnsembleConfig(), **extra)
    nan_at = 199  # the last step: the temperature learns from the NaN and would turn every later row to NaN
    rows_run = _ensemble_run(config, False, nan_at=nan_at)
    fused_run = _ensemble_run(config, True, nan_at=nan_at)
    assert rows_run[1] == fused_run[1]
    assert np.array_equal(rows_run[0].weights, fused_run[0].weights)
    assert np.array_equal([rows_run[0].temperature], [fused_run[0].temperature], equal_nan=True)
    for a, b in ((rows_run[0].bias, fused_run[0].bias), (rows_run[0].context_bias, fused_run[0].context_bias)):
        assert (a is None and b is None) or np.array_equal(a.view(np.int32), b.view(np.int32))
    decoded = _ensemble_run(config, True, nan_at=nan_at, code=fused_run[1])
    assert np.array_equal(decoded[2], fused_run[2])
    assert fused_run[0].skipped == rows_run[0].skipped and (fused_run[0].skipped > 0) == ("skip_min_trials" in extra)


@pytest.mark.parametrize("n_vocab", [300, 1030, 4104, 49152, 262144])
def test_fused_step_sums_are_numpys(n_vocab):
    """ensemble_int24's model row sums, dots with the logits and mixed row sums are numpy's
    bits (row.sum() and (row * logits).sum() in its pairwise order)."""
    from nacrith.predictors.llm import _SCALE, LogitTable, _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    rng = np.random.default_rng(n_vocab)
    streams = 3
    logits = (rng.normal(size=(streams, n_vocab)) * 4).astype(np.float32)
    rows = LogitTable(n_vocab, streams, use_kernel=False).probabilities(logits).copy()
    weight0 = rng.uniform(0.2, 0.9, streams)
    candidates = np.array([5, 17, 2, 9, 1], np.int64)
    offsets = np.array([0, 2, 2, 5], np.int64)
    additions = rng.uniform(0, 0.1, len(candidates))
    outputs = tuple(np.empty(streams) for _ in range(4))  # model totals, dots, mixed totals, p_token
    state = np.array([0, 2**64 - 1, 0, 0], np.uint64)
    _kernels.ensemble_int24(True, logits, np.arange(streams), np.empty((0, n_vocab)), np.array([3, 4, 5], np.int32), n_vocab, float(_SCALE),
                            1.0, (None, (), None, 0.5, None, (), None, 0.3, 1.0), (weight0, offsets, candidates, additions), outputs, state,
                            np.empty(streams, np.uint32))
    model_totals, dots, mixed_totals, _ = outputs
    assert np.array_equal(model_totals, rows.sum(axis=1))
    assert np.array_equal(dots, np.array([(row * x.astype(np.float64)).sum() for row, x in zip(rows, logits)]))
    for s in range(streams):
        mixed = rows[s] * (weight0[s] / rows[s].sum())
        mixed[candidates[offsets[s]:offsets[s + 1]]] += additions[offsets[s]:offsets[s + 1]]
        assert mixed_totals[s] == mixed.sum(), s


def test_fused_step_refuses_what_does_not_fit():
    """ensemble_int24 checks its counts and indices before it touches memory."""
    from nacrith.predictors.llm import _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    n = 10

    def call(wanted=(0,), symbols=(3,), offsets=(0, 1), candidates=(4,), state=(0, 2**64 - 1, 0, 0), words=4):
        return _kernels.ensemble_int24(
            True, np.zeros((len(wanted), n), np.float32), np.array(wanted, np.int64), np.ones((len(symbols) - len(wanted), n)),
            np.array(symbols, np.int32), n, 92.0, 1.0, (None, (), None, 0.5, None, (), None, 0.3, 1.0),
            (np.ones(len(wanted)), np.array(offsets, np.int64), np.array(candidates, np.int64), np.ones(len(candidates))),
            tuple(np.empty(len(wanted)) for _ in range(4)), np.array(state, np.uint64), np.empty(words, np.uint32))

    assert call() == 0 and call(wanted=(1,), symbols=(3, 3)) == 0  # valid: nothing written yet
    for bad in (dict(symbols=(10,)), dict(candidates=(10,)), dict(offsets=(0, 2)), dict(wanted=(2,), symbols=(3, 3)),
                dict(wanted=(1, 0), symbols=(3, 3), offsets=(0, 1, 1)), dict(state=(0, 2**64 - 1, 0)), dict(words=0)):
        with pytest.raises(ValueError):
            call(**bad)


def _dispatched_features() -> list[str]:
    """numpy's run-time SIMD targets that this host has (AVX2, AVX-512 groups on x86)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    return [name for name in umath.__cpu_dispatch__ if umath.__cpu_features__.get(name)]


MIXER_STATE = """
import hashlib, json, sys
import numpy as np
from nacrith.coder import make_encoder
from nacrith.predictors.ensemble import PRESETS, EnsemblePredictor

def state(preset):
    # 3 streams x 150 steps of random rows over a 300-token vocabulary, the symbols drawn
    # from a few tokens so that the n-gram, the mixer and its weights all come into play
    rng = np.random.default_rng(3)
    predictor, encoder = EnsemblePredictor(300, 3, PRESETS[preset]), make_encoder("int24")
    for _ in range(150):
        predictor.want_logits(3)
        rows = predictor.probabilities((rng.normal(size=(3, 300)) * 3).astype(np.float32), 3)
        symbols = rng.integers(0, 6, 3)
        encoder.encode(symbols, rows)
        predictor.update(symbols)
    weights = np.array([w for stream in predictor.streams for row in stream.weights for w in row])
    return hashlib.sha256(weights.tobytes() + encoder.finish()).hexdigest()

print(json.dumps({"exp": np.exp(np.linspace(-30.0, 0.0, 20001)).tolist(), "v2": state("v2"), "v3": state("v3"), "v4": state("v4")}))
"""


def test_mixer_state_is_the_same_without_numpys_simd():
    """The default ensemble's state (mixer weights, coded bytes) is the same in a process whose
    numpy runs none of its SIMD variants (as on an older CPU). numpy's float64 exp differs
    between those variants in the last bit, and preset v2's mixer used it (its weights drift
    apart, as this checks); v3's softmax uses portable_exp."""
    import json
    import os
    import subprocess
    import sys

    features = _dispatched_features()
    if not features:
        pytest.skip("numpy dispatches no SIMD variants on this host")
    results = []
    for disabled in ("", ",".join(features)):
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        run = subprocess.run([sys.executable, "-c", MIXER_STATE], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    here, elsewhere = results
    if here["exp"] == elsewhere["exp"]:
        pytest.skip("numpy's exp is the same without its SIMD variants here: nothing to compare")
    assert here["v2"] != elsewhere["v2"]  # the check sees the difference np.exp makes
    assert here["v3"] == elsewhere["v3"]
    assert here["v4"] == elsewhere["v4"]
