"""The exact engine: its tables, its weights, and every implementation giving the same integers.

The random model of :mod:`nacrith.exact.tiny` (2 layers, width 64, 283 tokens) runs every
operation in milliseconds; the default model is checked for a few hundred tokens.
"""
from __future__ import annotations

import decimal
import io
import math
from fractions import Fraction

import numpy as np
import pytest

from nacrith import pipeline
from nacrith.errors import ModelMismatchError, UnsupportedModelError
from nacrith.exact import kernel, reference, tables, tiny
from nacrith.exact import weights as W
from nacrith.exact.engine import ExactModel, chosen_implementation
from nacrith.gguf import GGUFFormatError

C_PATHS = [name for name, level in (("scalar", 0), ("avx2", 1), ("vnni", 2)) if kernel.available() and kernel.best_simd() >= level]
try:
    import torch  # noqa: F401  (the optional extra: `make test` installs its CPU build)

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
IMPLEMENTATIONS = ["reference"] + C_PATHS + (["torch"] if HAVE_TORCH else [])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("exact") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def tiny_weights(tiny_model):
    return W.load(tiny_model)


# --- tables ---------------------------------------------------------------------------------


def test_tables_have_their_pinned_digests():
    assert tables.digest(tables.exp2_table()) == "ee41e5a8fbd47f52bd996054c08d7a2bdeaa04b5bc80253bd03abbae18abc24a"
    assert tables.digest(tables.sigmoid_table()) == "8f0fc46a4756d972a0d1994e76bbe0649e9939993236bab1ea8f1a24cd82fe0d"
    cos, sin = tables.rope_table(100000.0, 64, 8192)
    assert tables.digest(cos) == "5da7387a6273c7de6259c21ab47ef517c3d53fb7d8ea911b7713c6b7da8bcf38"
    assert tables.digest(sin) == "a49b20573f702ea8abafbb280dfdde6618184e14ae42215be605d02b6f98466d"


def _rounded(value: decimal.Decimal) -> int:
    return int((value * (1 << 30) + decimal.Decimal("0.5")).to_integral_value(rounding=decimal.ROUND_FLOOR))


def test_table_entries_are_the_correctly_rounded_values():
    """Spot checks against direct evaluation at 50 digits (independent of the recurrences)."""
    decimal.getcontext().prec = 50
    D = decimal.Decimal
    exp2 = tables.exp2_table()
    for f in (0, 1, 2, 511, 512, 777, 1023):
        assert exp2[f] == _rounded(D(2) ** (D(-f) / 1024))
    sigmoid = tables.sigmoid_table()
    for i in (-16384, -9000, -1, 0, 1, 5000, 16384):
        assert sigmoid[i + 16384] == _rounded(1 / (1 + (D(-i) / 1024).exp()))
    cos, sin = tables.rope_table(100000.0, 64, 8192)
    for p, j in ((1, 0), (8191, 0), (4000, 7), (1234, 31), (8191, 31)):
        theta = (-(D(2 * j) / 64) * D(100000).ln()).exp()
        angle = p * theta
        # cos and sin by their series after reducing the angle by whole turns
        pi = D("3.14159265358979323846264338327950288419716939937510")
        angle -= (2 * pi) * int(angle / (2 * pi))
        c, s, term, k = D(0), D(0), D(1), 0
        while abs(term) > D(10) ** -45:
            if k % 2 == 0:
                c += term * (-1 if k % 4 == 2 else 1)
            else:
                s += term * (-1 if k % 4 == 3 else 1)
            k += 1
            term = term * angle / k
        assert cos[p, j] == _rounded(c) and sin[p, j] == _rounded(s)


def test_rope_tables_of_shorter_windows_are_prefixes():
    long_cos, long_sin = tables.rope_table(10000.0, 16, 200)
    cos, sin = tables.rope_table(10000.0, 16, 50)
    assert np.array_equal(cos, long_cos[:50]) and np.array_equal(sin, long_sin[:50])


# --- weights -------------------------------------------------------------------------------


def _exact_row(weights: np.ndarray):
    """Section 2.1 of docs/exact-engine.md with Python fractions."""
    values = [Fraction(float(v)) for v in weights]
    largest = max(abs(v) for v in values)
    if largest == 0:
        return [0] * len(values), 1, 0
    _, x = math.frexp(largest)
    e = 22 - x
    m = math.ceil(largest * Fraction(2) ** e / 127)
    q = []
    for v in values:
        ratio = abs(v) * Fraction(2) ** e / m
        whole = math.floor(ratio + Fraction(1, 2))  # halves away from zero (on the magnitude)
        q.append(int(whole) if v >= 0 else -int(whole))
    return q, m, e


@pytest.mark.parametrize("kind", [0, 1, 3, 8])
def test_row_quantization_is_exact(tmp_path, kind):
    path = tiny.write_tiny_llama(tmp_path / "m.gguf", seed=kind, n_layer=1, matrix_type=kind)
    weights = W.load(path)
    raw = W.dequantize  # the exact weights of the file, rows of attn_q
    from nacrith.requantize import read_layout

    with open(path, "rb") as handle:
        layout = read_layout(handle)
    tensor = next(t for t in layout.tensors if t.name == b"blk.0.attn_q.weight")
    data = np.fromfile(path, np.uint8)[layout.data_start + tensor.offset:][: tensor.nbytes()]
    rows = raw(tensor.kind, data, tensor.weights).reshape(64, 64)
    matrix = weights.layers[0]["attn_q"]
    for r in (0, 7, 63):
        q, m, e = _exact_row(rows[r])
        assert list(matrix.q[r]) == q and matrix.m[r] == m and matrix.e[r] == e
    assert np.abs(matrix.q.astype(int)).max() <= 127


def test_zero_rows_and_gains():
    matrix = W.quantize_rows(np.zeros((2, 8)))
    assert not matrix.q.any() and list(matrix.m) == [1, 1]
    gain = W.quantize_gain(np.array([0.5, -1.25, 3.0]))
    assert gain.bits == 13 and list(gain.G) == [4096, -10240, 24576]


def test_weights_cache_round_trip(tmp_path, tiny_model, tiny_weights):
    target = tmp_path / "w.nxw"
    W.save(tiny_weights, target)
    again = W.read_saved(target)
    assert again.hyper == tiny_weights.hyper
    for a, b in zip(W._arrays(again).values(), W._arrays(tiny_weights).values()):
        assert np.array_equal(a, b)
    data = bytearray(target.read_bytes())
    data[-100] ^= 1
    target.write_bytes(bytes(data))
    assert W.read_saved(target) is None  # a damaged cache file is made anew, never used


# --- implementations agree -------------------------------------------------------------------


def _run(context, tokens: np.ndarray, ctx: int, slide: int, widths) -> list[np.ndarray]:
    """Logits of every step: the batch narrows as ``widths`` says, some streams skip logits,
    windows slide at ``ctx``."""
    out, position = [], 0
    context.reset()
    for step, row in enumerate(tokens):
        n = widths[step]
        if position == ctx:
            for stream in range(n):
                context.slide(stream, 1, slide, ctx)
            position -= slide
        want = np.ones(n, bool)
        want[step % n] = step % 3 != 0
        out.append(np.array(context.step(row[:n], np.full(n, position), want), np.int64))
        position += 1
    return out


def _contexts(weights, n, ctx):
    yield "reference", reference.ReferenceContext(weights, n, ctx)
    if HAVE_TORCH:
        from nacrith.exact.torch_engine import TorchContext, TorchModel

        yield "torch", TorchContext(TorchModel(weights, "cpu"), n, ctx)
    if kernel.available():
        model = kernel.KernelModel(weights)
        for name in C_PATHS:
            level = {"scalar": 0, "avx2": 1, "vnni": 2}[name]
            for threads in (1, 2):
                yield f"{name}/{threads}", kernel.KernelContext(model, n, ctx, threads, level)


def test_every_implementation_gives_the_same_integers(tiny_weights):
    rng = np.random.default_rng(7)
    n, ctx, slide, steps = 6, 40, 12, 110
    tokens = rng.integers(0, tiny_weights.hyper.n_vocab, (steps, n))
    widths = [n if s < 80 else n - 1 - (s - 80) // 10 for s in range(steps)]
    results = {name: _run(context, tokens, ctx, slide, widths) for name, context in _contexts(tiny_weights, n, ctx)}
    expected = results.pop("reference")
    assert len(expected) == steps and expected[0].shape == (n - 1, tiny_weights.hyper.n_vocab)
    for name, logits in results.items():
        for step, (a, b) in enumerate(zip(logits, expected)):
            assert np.array_equal(a, b), f"{name} differs at step {step}"


def test_a_streams_logits_do_not_depend_on_its_companions(tiny_weights):
    """The same stream alone, as the first of three, and as the last of three."""
    rng = np.random.default_rng(11)
    steps, ctx = 30, 64
    mine = rng.integers(0, tiny_weights.hyper.n_vocab, steps)
    others = rng.integers(0, tiny_weights.hyper.n_vocab, (steps, 2))
    for name, context in _contexts(tiny_weights, 3, ctx):
        alone, first, last = [], [], []
        for layout, sink in ((None, alone), (0, first), (2, last)):
            context.reset()
            for step in range(steps):
                if layout is None:
                    batch = mine[step:step + 1]
                else:
                    batch = np.insert(others[step], layout, mine[step])
                logits = np.array(context.step(batch, np.full(len(batch), step)), np.int64)
                sink.append(logits[0 if layout in (None, 0) else 2])
        assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(alone, first, last)), name


@pytest.mark.slow
@pytest.mark.skipif(not kernel.available(), reason="the C kernel is not built")
def test_the_default_model_agrees_for_a_few_hundred_tokens():
    from nacrith.model import locate
    from nacrith.session import Session

    info = locate()
    session = Session(info.path, engine="exact", threads=2)
    try:
        text = (b"Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
                b"once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it. ") * 3
        tokens = np.asarray(session.tokenizer.encode(text), np.int64)
        n, steps = 3, 48
        table = tokens[: n * steps].reshape(n, steps).T
        weights = session.llama.weights
        results = {name: _run(context, table, 32, 8, [n] * steps) for name, context in _contexts(weights, n, 32)}
    finally:
        session.close()
    expected = results.pop("reference")
    for name, logits in results.items():
        assert all(np.array_equal(a, b) for a, b in zip(logits, expected)), name


# --- containers ---------------------------------------------------------------------------------

TEXT = (b"the rain in spain stays mainly in the plain; the hen is in the inn. " * 12
        + "Ünïcödé, 中文, 🙂 and bytes \xff\xfe of other kinds.\n".encode("utf-8", "surrogateescape") * 2)
SMALL = dict(ctx=32, slide=8, min_stream_tokens=8, fallback=False)


def _pack(model, data: bytes, implementation: str, monkeypatch, **options) -> bytes:
    monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
    return pipeline.compress(data, model=str(model), engine="exact", **{**SMALL, **options})


def _unpack(model, blob: bytes, implementation: str, monkeypatch, **options) -> bytes:
    monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
    return pipeline.decompress(blob, model=str(model), **options)


@pytest.mark.slow
def test_containers_are_the_same_whatever_the_implementation(tiny_model, monkeypatch):
    blobs = {name: _pack(tiny_model, TEXT, name, monkeypatch, streams=4) for name in IMPLEMENTATIONS}
    first = blobs[IMPLEMENTATIONS[0]]
    assert all(blob == first for blob in blobs.values())
    for name in IMPLEMENTATIONS:
        assert _unpack(tiny_model, first, name, monkeypatch) == TEXT


def test_containers_decode_with_other_streams_threads_and_workers(tiny_model, monkeypatch):
    blob = _pack(tiny_model, TEXT * 2, C_PATHS[-1] if C_PATHS else "reference", monkeypatch, streams=5, block_size=700, threads=1)
    assert _unpack(tiny_model, blob, "scalar" if C_PATHS else "reference", monkeypatch, threads=2) == TEXT * 2
    assert _unpack(tiny_model, blob, C_PATHS[-1] if C_PATHS else "reference", monkeypatch, workers=2) == TEXT * 2
    again = _pack(tiny_model, TEXT * 2, "reference", monkeypatch, streams=5, block_size=700, workers=2)
    assert again == blob


def test_the_container_records_the_engine(tiny_model, monkeypatch):
    from nacrith import container

    blob = _pack(tiny_model, TEXT, IMPLEMENTATIONS[-1], monkeypatch)
    section = container.parse(blob).header.model
    assert section.engine == "exact (spec 1)" and section.backend == "any" and section.cpu_build is None
    # both strings are table entries: a byte each
    assert b"exact" not in blob[:60] and b"any" not in blob[:60]


def test_a_newer_spec_is_refused(tiny_model, monkeypatch):
    from nacrith import container
    from nacrith.errors import UnsupportedVersionError

    blob = _pack(tiny_model, TEXT, IMPLEMENTATIONS[-1], monkeypatch)
    parsed = container.parse(blob)
    newer = container.Header(container.ModelSection(**{**parsed.header.model.__dict__, "engine": "exact (spec 2)"}))
    with pytest.raises(UnsupportedVersionError, match="spec 2"):
        pipeline.decode_parsed(container.Container(newer, parsed.blocks, parsed.trailer), io.BytesIO(), model=str(tiny_model))


# --- bad models ------------------------------------------------------------------------------


def test_another_architecture_is_refused_in_one_line(tmp_path):
    path = tiny.write_tiny_llama(tmp_path / "other.gguf", architecture="gemma3")
    with pytest.raises(UnsupportedModelError, match="Llama-architecture.*'gemma3'"):
        W.load(path)


def test_biases_are_refused(tmp_path):
    path = tiny.write_tiny_llama(tmp_path / "bias.gguf", extra_tensors={"blk.0.attn_q.bias": ((64,), 0, np.zeros(64))})
    with pytest.raises(UnsupportedModelError, match="biases"):
        W.load(path)


def test_truncated_model_is_refused(tmp_path, tiny_model):
    data = tiny_model.read_bytes()
    for cut in (20, 3000, len(data) - 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="truncated"):
            W.load(path)


def test_decoding_with_a_model_of_another_digest_is_refused(tmp_path, tiny_model, monkeypatch):
    blob = _pack(tiny_model, TEXT, IMPLEMENTATIONS[-1], monkeypatch)
    other = tiny.write_tiny_llama(tmp_path / "other.gguf", seed=99)
    with pytest.raises(ModelMismatchError, match="made with model"):
        _unpack(other, blob, IMPLEMENTATIONS[-1], monkeypatch)


def test_unknown_implementation_is_refused(monkeypatch):
    from nacrith.errors import EngineError

    monkeypatch.setenv("NACRITH_EXACT_IMPL", "gpu9000")
    with pytest.raises(EngineError, match="NACRITH_EXACT_IMPL"):
        chosen_implementation()


def test_torch_missing_is_one_line(monkeypatch):
    import sys

    from nacrith.errors import EngineError
    from nacrith.exact.torch_engine import require_torch

    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    with pytest.raises(EngineError, match=r"needs PyTorch: pip install 'nacrith\[gpu\]'"):
        require_torch()
    monkeypatch.setenv("NACRITH_EXACT_IMPL", "torch")
    with pytest.raises(EngineError, match="needs PyTorch"):
        chosen_implementation()


def test_exact_model_reports_its_implementation(tiny_model, monkeypatch):
    from nacrith.model import fingerprint

    monkeypatch.delenv("NACRITH_EXACT_IMPL", raising=False)
    model = ExactModel(tiny_model, fingerprint(tiny_model))
    assert model.description in ("reference", "C scalar", "C avx2", "C avx512-vnni")
    if HAVE_TORCH:
        monkeypatch.setenv("NACRITH_EXACT_IMPL", "torch")
        assert ExactModel(tiny_model, fingerprint(tiny_model)).description == "torch (cpu)"
    assert model.n_vocab == 283 and model.bos == 1


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed")
def test_torch_whole_window_step_equals_the_step(tiny_weights):
    """The fixed-shape step that CUDA graphs capture (every cell of the window, those past a
    stream's position masked) gives the same logits as the step over the cells in use."""
    import torch

    from nacrith.exact.torch_engine import TorchContext, TorchModel

    model = TorchModel(tiny_weights, "cpu")
    rng = np.random.default_rng(5)
    a, b = TorchContext(model, 3, 24), TorchContext(model, 3, 24)
    for step in range(30):
        position = step if step < 24 else step - 8
        if step == 24:
            for context in (a, b):
                for stream in range(3):
                    context.slide(stream, 1, 8, 24)
        tokens = rng.integers(0, tiny_weights.hyper.n_vocab, 3)
        positions = np.array([position, max(0, position - 1), position])  # streams at different cells too
        expected = a.step(tokens, positions)
        whole = b._forward(torch.as_tensor(tokens), torch.as_tensor(positions), 24).numpy()
        assert np.array_equal(expected, whole), step


def test_the_specification_states_the_code_s_constants_and_digests():
    """docs/exact-engine.md's constants table and table digests are the code's."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "exact-engine.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, re.M))
    values = {"F": reference.F, "ACT_BITS": reference.ACT_BITS, "KV_BITS": reference.KV_BITS, "SCORE_BITS": reference.SCORE_BITS,
              "PROB_BITS": reference.PROB_BITS, "LOG2E": reference.LOG2E}
    for name, value in values.items():
        assert int(rows[name]) == value, name
    assert rows["SCORE_LIMIT"] == "2^47" and reference.SCORE_LIMIT == 1 << 47
    assert rows["PROB_MAX"] == "2^14 - 1" and reference.PROB_MAX == (1 << 14) - 1
    assert rows["DIST_MAX"] == "2^31 - 1" and reference.MAX_DISTANCE == (1 << 31) - 1
    assert reference.LOG2E == round(2**30 * math.log2(math.e))
    cos, sin = tables.rope_table(100000.0, 64, 8192)
    for array in (tables.exp2_table(), tables.sigmoid_table(), cos, sin):
        assert tables.digest(array) in text
    assert f"Spec {reference.SPEC_VERSION}" in text and f"specification version {reference.SPEC_VERSION}" in text


@pytest.mark.parametrize("damage", ["architecture", "truncated"])
def test_the_command_line_refuses_a_bad_model_in_one_line_and_writes_nothing(tmp_path, tiny_model, damage):
    import subprocess
    import sys

    if damage == "architecture":
        model = tiny.write_tiny_llama(tmp_path / "bad.gguf", architecture="gemma3")
        expected = b"Llama-architecture"
    else:
        model = tmp_path / "bad.gguf"
        model.write_bytes(tiny_model.read_bytes()[:5000])
        expected = b"truncated GGUF"
    source = tmp_path / "in.txt"
    source.write_bytes(TEXT)
    done = subprocess.run([sys.executable, "-m", "nacrith.cli", "compress", "--engine", "exact", "--model", str(model), str(source)],
                          capture_output=True)
    assert done.returncode == 1 and done.stderr.count(b"\n") == 1 and expected in done.stderr, done.stderr
    assert not (tmp_path / "in.txt.nc").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "in.txt"]
