"""The integer ensemble (preset v5): its head's numpy reference and PyTorch implementation
give the same integers, so containers made with either are the same bytes and decode with
the other, through the exact engine's C kernel, its PyTorch implementation and workers."""
from __future__ import annotations

import numpy as np
import pytest

from nacrith import container as fmt
from nacrith import pipeline
from nacrith.coder import make_decoder, make_encoder
from nacrith.exact import tiny
from nacrith.predictors import ensemble_config, make_predictor, predictor_settings
from nacrith.predictors import integer as I
from nacrith.predictors.ensemble import PRESETS, EnsembleConfig

torch = pytest.importorskip("torch", reason="PyTorch is the exact engine's GPU extra (make test installs its CPU build)")

V5 = PRESETS["v5"]


def test_isqrt_is_exact_at_squares_and_their_neighbours():
    roots = np.array([0, 1, 2, 3, 1023, 1024, 1 << 20, (1 << 30) - 1, 1 << 30, 3037000499 // 2], np.int64)
    values = np.concatenate([roots * roots - 1, roots * roots, roots * roots + 1, [I.SQUARES_LIMIT + (1 << 20)]])
    values = values[values >= 0]
    expected = np.array([int(v) ** 0.5 // 1 for v in values.tolist()], np.int64)  # float: checked below by squaring
    expected = np.array([r - 1 if r * r > v else r + 1 if (r + 1) * (r + 1) <= v else r for r, v in zip(expected.tolist(), values.tolist())])
    assert (I.isqrt_numpy(values) == expected).all()
    assert (I.isqrt_torch(torch, torch.as_tensor(values)).numpy() == expected).all()


def _random_steps(n_vocab: int, running: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        want = rng.random(running) < 0.7
        wanted = np.flatnonzero(want)
        logits = rng.integers(-(1 << 31), 1 << 31, (len(wanted), n_vocab)) >> rng.integers(0, 24)
        counts = rng.integers(0, 6, running)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        tokens = np.concatenate([rng.choice(n_vocab, c, replace=False) for c in counts]).astype(np.int64)
        values = rng.integers(0, 1 << 27, len(tokens))
        c0 = np.where(want, 0, rng.integers(0, 1 << 14, running))
        step = I.StepInput(running, wanted, rng.integers(0, 3, len(wanted)), rng.integers(0, 5, len(wanted)),
                           rng.integers(1, 1 << 16, len(wanted)), c0, offsets, tokens, values)
        yield logits, step, rng.integers(0, n_vocab, running)


HEADS = ["numpy"] + (["C kernel"] if I.NumpyHead(3, 0, 0, 0.5, 0.3, 0).use_kernel else []) + ["torch"]


def _head(kind: str, *arguments):
    if kind == "torch":
        return I.TorchHead(torch, "cpu", *arguments)
    return I.NumpyHead(*arguments, use_kernel=kind == "C kernel")


def _as_numpy(values):
    return values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


@pytest.mark.parametrize("kind", HEADS[1:])
def test_each_head_computes_the_numpy_reference_s_integers(kind):
    n_vocab, running = 97, 9
    heads = [_head("numpy", n_vocab, 3, 5, 0.5, 0.3, 1e-4), _head(kind, n_vocab, 3, 5, 0.5, 0.3, 1e-4)]
    moved = False
    for logits, step, symbols in _random_steps(n_vocab, running, 40, seed=5):
        reference = heads[0].rows(logits, step)
        rows = heads[1].rows(torch.as_tensor(logits) if kind == "torch" else logits, step)
        w, totals = rows._weights() if kind == "torch" else rows
        assert (_as_numpy(w).astype(np.uint32) == reference.weights).all()
        assert (_as_numpy(totals).astype(np.int64) == reference.totals.astype(np.int64)).all()
        assert (heads[0]._step["rows"] < 1 << 32).all()
        for a, b in zip(heads[0].coded(symbols), heads[1].coded(symbols)):
            assert (a == b).all()
        for head in heads:
            head.learn(symbols)
        for name in ("b1", "q1", "b2", "q2"):
            assert (getattr(heads[0], name) == _as_numpy(getattr(heads[1], name))).all(), name
        assert heads[0].tau == int(heads[1].tau)
        moved = moved or heads[0].tau != I.TAU_ONE
    assert moved and heads[0].b1.any() and heads[0].q2.any() and (heads[0].b1 < 0).any()


def _tokens(n_vocab: int, streams: int, length: int, seed: int) -> np.ndarray:
    """Streams of a repeated phrase, the first with some noise: n-grams, matches and skips all fire."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, n_vocab, 23)
    table = np.array([[phrase[(s * 5 + k) % 23] for k in range(length)] for s in range(streams)])
    noise = rng.random(table.shape) < 0.05
    noise[1:] = False
    table[noise] = rng.integers(0, n_vocab, int(noise.sum()))
    return table.astype(np.int32)


def _code(kind: str, tokens: np.ndarray, logits: np.ndarray, blob: bytes | None = None):
    """Code ``tokens`` (streams x steps) with the v5 predictor fed ``logits`` (steps x streams x
    vocabulary, integers) as float32 rows (the numpy head) or as device logits (the torch
    head); decode ``blob`` instead where given. Returns (bytes or tokens, predictor)."""
    from nacrith.exact.device_rows import DeviceLogits

    streams, steps = tokens.shape
    n_vocab = logits.shape[2]
    predictor = make_predictor(predictor_settings(V5), n_vocab, streams)
    predictor.use_int24_rows(True)
    coder = make_encoder("int24") if blob is None else make_decoder(blob, "int24")
    out = np.zeros_like(tokens)
    for k in range(steps):
        want = predictor.want_logits(streams)
        rows = logits[k] if want is None else logits[k][np.flatnonzero(want)]
        if kind == "torch":
            rows = DeviceLogits(torch, torch.as_tensor(rows))
        else:
            rows = rows.astype(np.float32) * np.float32(2.0 ** -14)
        coded = predictor.probabilities(rows, streams)
        if blob is None:
            coder.encode(tokens[:, k], coded)
            symbols = tokens[:, k]
        else:
            symbols = coder.decode(coded)
        out[:, k] = symbols
        predictor.update(symbols)
    return (coder.finish() if blob is None else out), predictor


def test_the_predictor_codes_the_same_bytes_with_either_head_and_decodes_with_the_other():
    n_vocab, streams, steps = 211, 5, 200
    tokens = _tokens(n_vocab, streams, steps, seed=2)
    rng = np.random.default_rng(3)
    logits = rng.integers(-(1 << 18), 1 << 18, (steps, streams, n_vocab))
    logits[np.arange(steps)[:, None], np.arange(streams)[None, :], tokens.T] += 1 << 16  # a model that helps
    blob, predictor = _code("numpy", tokens, logits)
    assert predictor.skipped > 0  # the skipped rows' path is exercised
    assert predictor.head.tau != I.TAU_ONE
    again, _ = _code("torch", tokens, logits)
    assert again == blob
    assert (_code("torch", tokens, logits, blob)[0] == tokens).all()
    assert (_code("numpy", tokens, logits, blob)[0] == tokens).all()
    damaged = bytes([blob[0] ^ 0x40]) + blob[1:]
    with pytest.raises(Exception):
        decoded, _ = _code("numpy", tokens, logits, damaged)
        assert (decoded == tokens).all()


def test_v5_is_recorded_by_name_and_checked():
    assert predictor_settings(V5) == {"llm": "exp2-q64", "ensemble": "v5"}
    assert ensemble_config({"llm": "exp2-q64", "ensemble": "v5"}) == V5
    assert predictor_settings(EnsembleConfig())["ensemble"] == "v4"
    with pytest.raises(ValueError, match="integer ensemble"):
        ensemble_config({"llm": "exp2-q64", "ensemble": "v5", "set": {"bias_rule": "sgd"}})
    with pytest.raises(ValueError, match="int24"):
        pipeline.Settings(ensemble=V5, coder="constriction").validate()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("integer") / "tiny.gguf", seed=3)


TEXT = b"the rain in spain stays mainly in the plain; the hen is in the inn. " * 14 + b"a b c d e f g h\n" * 20
SMALL = dict(ctx=32, slide=8, min_stream_tokens=8, fallback=False, engine="exact", ensemble=V5)


def test_containers_are_the_same_with_the_c_kernel_and_pytorch_and_decode_with_either(tiny_model, monkeypatch):
    blobs = {}
    for implementation in ("simd", "torch"):
        monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
        blobs[implementation] = pipeline.compress(TEXT, model=str(tiny_model), streams=4, **SMALL)
    assert blobs["simd"] == blobs["torch"]
    assert fmt.parse(blobs["simd"]).header.model.predictor == {"llm": "exp2-q64", "ensemble": "v5"}
    for implementation in ("torch", "simd"):
        monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
        assert pipeline.decompress(blobs["simd"], model=str(tiny_model)) == TEXT
    monkeypatch.setenv("NACRITH_EXACT_IMPL", "simd")
    assert pipeline.decompress(blobs["simd"], model=str(tiny_model), workers=2, threads=1) == TEXT
    other = pipeline.compress(TEXT, model=str(tiny_model), streams=4, **{**SMALL, "ensemble": PRESETS["v4"]})
    assert other != blobs["simd"] and pipeline.decompress(other, model=str(tiny_model)) == TEXT


def test_the_command_line_picks_v5_for_the_exact_engine_on_gpus_and_on_request(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from nacrith import cli

    source = tmp_path / "a.txt"
    source.write_bytes(b"text")
    seen = []
    monkeypatch.setattr(cli, "compress_one", lambda name, settings, *rest: seen.append(settings.ensemble))
    for arguments in ([], ["--gpus", "all"], ["--gpus", "all", "--engine", "exact"], ["--preset", "v5"],
                      ["--gpus", "0", "--engine", "exact", "--preset", "v4"], ["--preset", "v5", "--no-match"]):
        result = CliRunner().invoke(cli.main_group, ["compress", *arguments, str(source)])
        assert result.exit_code == 0, result.output
    assert [config.arithmetic for config in seen] == ["float", "float", "integer", "integer", "float", "integer"]
    assert not seen[-1].match and seen[-1].ngram
    refused = CliRunner().invoke(cli.main_group, ["compress", "--preset", "v9", str(source)])
    assert refused.exit_code == 2


def test_float_logits_become_the_same_integers_with_the_c_kernel_and_numpy():
    rng = np.random.default_rng(4)
    halves = (np.arange(-40, 40) * 2 + 1).astype(np.float32) / np.float32(1 << 15)  # x * 2^14 = k + 1/2: ties to even
    specials = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 2.0 ** 26, -(2.0 ** 26)], np.float32)
    logits = np.concatenate([halves, specials, rng.standard_normal(500).astype(np.float32) * 30])[None, :]
    reference = I.logits_to_integers(logits, use_kernel=False)
    assert reference[0, :80].tolist() == [int(np.rint(v)) for v in (halves.astype(np.float64) * (1 << 14)).tolist()]
    assert reference[0, 80:85].tolist() == [0, 1 << 40, -(1 << 40), 1 << 40, -(1 << 40)]
    if "C kernel" in HEADS:
        assert (I.logits_to_integers(logits) == reference).all()
