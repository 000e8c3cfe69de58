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

from .conftest import SMALL, pack, unpack

PARTS = ("ngram", "match", "bias", "mixer", "skip")
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


@pytest.mark.parametrize("switches", list(itertools.product([False, True], repeat=len(PARTS))), ids=lambda s: "".join("1" if x else "0" for x in s))
def test_every_combination_round_trips(session, switches):
    config = replace(EnsembleConfig(**EAGER_SKIP), **dict(zip(PARTS, switches)))
    same, _, _ = code(session, TEXT + REPETITIVE[:200], config)
    assert same


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


def test_skip_fires_on_repetitive_text(session):
    same, predictor, _ = code(session, REPETITIVE, EnsembleConfig(**EAGER_SKIP), n_streams=1)
    assert same
    assert predictor.skipped > 0.3 * predictor.steps


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
        "temperature_lr": 0.0, "bias_hash": 0,
    }
    assert PRESETS["v1"].to_dict() == v1
    assert PRESETS["v2"].to_dict() == {**v1, "temperature_lr": 1e-4, "bias_hash": 256}
    assert predictor_settings(EnsembleConfig()) == {"llm": "exp2-q64", "ensemble": "v2"}
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v1"}) == PRESETS["v1"]  # old files
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v1", "set": {"skip": False}}).skip is False
    with pytest.raises(ValueError):
        ensemble_config({"llm": "exp2-q64", "ensemble": "v9"})


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
                                   {"skip_min_trials": 2, "skip_confidence": 0.5}])
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
