"""The exact engine's distribution on its device (nacrith.exact.device_rows), the Triton
decoder (nacrith.exact.triton_decode, in Triton's interpreter on the CPU) and the exact
engine on GPUs (--gpus), as far as a machine without one can check them: the same
integers as the C kernel and the numpy reference, the same containers, and one-line
refusals where PyTorch has no CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nacrith import coder, pipeline
from nacrith.exact import tiny
from nacrith.predictors.llm import LogitTable

torch = pytest.importorskip("torch", reason="PyTorch is the exact engine's GPU extra (make test installs its CPU build)")
from nacrith.exact import device_rows as D  # noqa: E402
from nacrith.exact import triton_decode as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_kernel = pytest.mark.skipif(coder._kernels is None, reason="nacrith's C kernel is not built")


def _logits(rows: int, n: int, seed: int) -> np.ndarray:
    """Integer logits at 2^-14 of several kinds: spread, all equal, nearly equal, a few far
    above the rest, and beyond 2^24 (float32 rounds them)."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(-40 << 14, 40 << 14, size=(rows, n))
    logits[1] = 0
    logits[2] = rng.integers(-5, 5, n)
    logits[3, ::7] = 10 ** 7
    logits[4] = rng.integers(-(1 << 26), 1 << 26, n)
    return logits


def _float_rows(logits: np.ndarray) -> np.ndarray:
    return logits.astype(np.float32) * np.float32(2.0 ** -14)


@needs_kernel
@pytest.mark.parametrize("n", [283, 5000, 49152])
def test_weights_are_the_c_kernel_s(n):
    logits = _logits(6, n, n)
    expected = LogitTable(n, 6).weight_rows(_float_rows(logits))
    w, totals = D.weights(torch, torch.as_tensor(logits))
    assert np.array_equal(w.numpy(), expected.weights.astype(np.int64))
    assert np.array_equal(totals.numpy(), expected.totals.astype(np.int64))


def test_intervals_and_lefts_are_the_numpy_reference_s():
    n = 3001
    logits = _logits(6, n, 7)
    rows = LogitTable(n, 6, use_kernel=False).probabilities(_float_rows(logits))
    w, totals = D.weights(torch, torch.as_tensor(logits))
    symbols = np.array([0, n - 1, 5, 1000, 3000, 17])
    lefts, rights = D.intervals(torch, w, totals, torch.as_tensor(symbols))
    table = D.lefts_table(torch, w, totals).numpy()
    for r, symbol in enumerate(symbols):
        assert coder.interval(rows[r], int(symbol)) == (lefts[r].item(), rights[r].item())
        assert np.array_equal(coder._lefts(*coder.quantise(rows[r])), table[r])


@pytest.mark.parametrize("use_kernel", [True, False] if coder._kernels is not None else [False])
def test_device_rows_code_the_same_bytes_as_weight_rows(use_kernel):
    n, rows, steps = 1000, 9, 6
    rng = np.random.default_rng(5)
    logits = [_logits(rows, n, 100 + k) for k in range(steps)]
    symbols = [rng.integers(0, n, rows) for _ in range(steps)]
    table = LogitTable(n, rows, use_kernel=False)
    plain, device, intervals = coder.Int24Encoder(use_kernel), coder.Int24Encoder(use_kernel), coder.Int24Encoder(use_kernel)
    for step_logits, step_symbols in zip(logits, symbols):
        plain.encode(step_symbols, table.probabilities(_float_rows(step_logits)))
        device.encode(step_symbols, D.DeviceLogits(torch, torch.as_tensor(step_logits)))
        w, totals = D.weights(torch, torch.as_tensor(step_logits))
        lefts, rights = D.intervals(torch, w, totals, torch.as_tensor(step_symbols))
        intervals.encode_intervals(lefts.numpy(), rights.numpy())
    blob = plain.finish()
    assert device.finish() == blob and intervals.finish() == blob
    decoder = coder.Int24Decoder(blob, use_kernel)
    for step_logits, step_symbols in zip(logits, symbols):
        assert np.array_equal(decoder.decode(D.DeviceLogits(torch, torch.as_tensor(step_logits))), step_symbols)


def test_interval_coding_refuses_empty_intervals():
    for use_kernel in [True, False] if coder._kernels is not None else [False]:
        with pytest.raises(ValueError):
            coder.Int24Encoder(use_kernel).encode_intervals(np.array([5]), np.array([5]))
        with pytest.raises(ValueError):
            coder.Int24Encoder(use_kernel).encode_intervals(np.array([0]), np.array([(1 << 24) + 1]))


# --- the Triton decoder, in Triton's interpreter -------------------------------------------------

TRITON_CHECK = r"""
import os, numpy as np, torch
from nacrith import coder
from nacrith.exact import device_rows as D, triton_decode as T
device = os.environ.get("CHECK_DEVICE", "cpu")  # cuda on a GPU (tests/test_gpu_exact.py)
rng = np.random.default_rng(11)
for n, rows in ((283, 7), (3001, 12)):
    logits = [rng.integers(-30 << 14, 30 << 14, size=(rows, n)) for _ in range(4)]
    for step in logits:
        step[1] = 0
        step[:, 3] += 50 << 14
    symbols = [rng.integers(0, n, rows) for _ in logits]
    for step in symbols:
        step[0], step[1] = n - 1, 0
    encoder = coder.Int24Encoder(False)
    for step_logits, step_symbols in zip(logits, symbols):
        encoder.encode(step_symbols, D.DeviceLogits(torch, torch.as_tensor(step_logits)))
    blob = encoder.finish()
    # good data, then random and all-ones words (invalid: the quantile reaches 2^24): the
    # kernel's symbols, counts and states are the numpy decoder's
    for data in (blob, rng.integers(0, 1 << 32, 64, dtype=np.uint64).astype("<u4").tobytes(), b"\xff" * 64):
        ours, theirs = coder.Int24Decoder(data, False), coder.Int24Decoder(data, False)
        for k, step_logits in enumerate(logits):
            w, totals = D.weights(torch, torch.as_tensor(step_logits, device=device))
            got, want = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
            count = T.decode(torch, D.prefix_sums(torch, w), D.scales(torch, totals, n), ours._state, ours._words, got)
            rows_ = coder.WeightRows(w.cpu().numpy().astype(np.uint32), totals.cpu().numpy().astype(np.uint64))
            expected = coder._decode_numpy(rows_, theirs._state, theirs._words, want)
            assert count == expected, (n, k, count, expected)
            assert np.array_equal(got[:count], want[:count]) and np.array_equal(ours._state, theirs._state), (n, k)
            if data is blob:
                assert count == rows and np.array_equal(got, symbols[k])
            if count < rows:
                break
        if data == b"\xff" * 64:
            assert count == 0
print("triton decoder ok")
"""


def _interpreted(code: str, **env) -> subprocess.CompletedProcess:
    """``python -c code`` with Triton's interpreter on (``TRITON_INTERPRET=0`` in ``env``: compiled, on a GPU)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **env})


@pytest.mark.slow
@pytest.mark.skipif(not T.available(), reason="Triton is not installed (make test installs it)")
def test_the_triton_decoder_is_the_numpy_decoder_in_the_interpreter():
    result = _interpreted(TRITON_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton decoder ok" in result.stdout


def test_the_probe_width_covers_the_row():
    for n in (2, 256, 257, 283, 49152, 262144):
        assert T.step_for(n) * T.COARSE >= n > T.step_for(n) * T.COARSE // 2 or n <= T.COARSE


# --- containers: the model alone through the device rows --------------------------------------------

TEXT = b"the rain in spain stays mainly in the plain; the hen is in the inn. " * 10
OPTIONS = dict(ctx=32, slide=8, min_stream_tokens=8, fallback=False, ensemble=None, engine="exact")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("device") / "tiny.gguf", seed=3)


def _pack(model, implementation: str, monkeypatch, **options) -> bytes:
    monkeypatch.setenv("NACRITH_EXACT_IMPL", implementation)
    return pipeline.compress(TEXT, model=str(model), **{**OPTIONS, **options})


@pytest.mark.parametrize("streams", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(7, marks=pytest.mark.slow)])
def test_the_model_alone_codes_the_same_container_through_device_rows(tiny_model, monkeypatch, streams):
    """NACRITH_EXACT_IMPL=torch codes the model alone through DeviceLogits (intervals
    computed by PyTorch): the same bytes as the C kernel's or the reference's float rows,
    decodable by either."""
    other = "simd" if coder._kernels is not None else "reference"
    blob = _pack(tiny_model, "torch", monkeypatch, streams=streams)
    assert blob == _pack(tiny_model, other, monkeypatch, streams=streams)
    monkeypatch.setenv("NACRITH_EXACT_IMPL", other)
    assert pipeline.decompress(blob, model=str(tiny_model)) == TEXT
    monkeypatch.setenv("NACRITH_EXACT_IMPL", "torch")
    assert pipeline.decompress(blob, model=str(tiny_model), workers=2) == TEXT


@pytest.mark.slow
@pytest.mark.skipif(not T.available(), reason="Triton is not installed (make test installs it)")
@pytest.mark.parametrize("preset", [None, "v5"])
def test_a_container_decodes_through_the_triton_decoder(tiny_model, monkeypatch, preset):
    """The GPU's decoding path (DeviceLogits, or preset v5's DeviceRows, -> the Triton
    kernel), run on the CPU in Triton's interpreter: a container made by the C kernel decodes."""
    from nacrith.predictors.ensemble import PRESETS

    options = {"ensemble": PRESETS[preset]} if preset else {}
    blob = _pack(tiny_model, "simd" if coder._kernels is not None else "reference", monkeypatch, streams=5, **options)
    code = ("import sys; from nacrith import pipeline; from nacrith.exact import device_rows; "
            f"sys.stdout.write(str(pipeline.decompress(bytes.fromhex('{blob.hex()}'), model={str(tiny_model)!r}) == {TEXT!r}))")
    result = _interpreted(code, NACRITH_EXACT_IMPL="torch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("True")


# --- --gpus with the exact engine, without a GPU ----------------------------------------------------


def test_exact_gpus_without_cuda_is_one_line(tiny_model, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    source = tmp_path / "a.txt"
    source.write_bytes(TEXT)
    result = subprocess.run([sys.executable, "-m", "nacrith.cli", "compress", "--engine", "exact", "--gpus", "all", "--model", str(tiny_model),
                             str(source)], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0] and "make install-gpu" in lines[0], result.stderr
    assert not (tmp_path / "a.txt.nc").exists()


@pytest.mark.slow
def test_decoding_an_exact_file_on_gpus_without_cuda_is_one_line(tiny_model, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.delenv("NACRITH_EXACT_IMPL", raising=False)
    packed = tmp_path / "a.txt.nc"
    packed.write_bytes(pipeline.compress(TEXT, model=str(tiny_model), ctx=32, slide=8, min_stream_tokens=8, fallback=False))
    for command in (["decompress", "-o", str(tmp_path / "a.txt")], ["test"]):
        result = subprocess.run([sys.executable, "-m", "nacrith.cli", *command, "--gpus", "0", "--model", str(tiny_model), str(packed)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and "make install-gpu" in result.stderr
    assert not (tmp_path / "a.txt").exists()
    assert pipeline.decompress(packed.read_bytes(), model=str(tiny_model)) == TEXT  # without --gpus: the CPU


@pytest.mark.parametrize("ensemble", ["model alone", "default", "v5"])
def test_the_gpu_path_on_a_stand_in_device_makes_the_cpu_s_container(tiny_model, monkeypatch, ensemble):
    """--gpus with the exact engine, every step of it (plan, session, model, contexts,
    device rows, header) with a stand-in GPU that is the CPU: the CPU's container, and
    decoding "on the GPU" (gpu_ids=()) restores it."""
    from nacrith.exact import torch_engine

    monkeypatch.setattr(torch_engine, "cuda_devices", lambda: [torch_engine.CudaDevice(0, "Stand-in", "Stand-in", 1 << 34, 1 << 34)])
    real, asked = torch_engine.TorchModel.__init__, []

    def stand_in(self, weights, device="cpu"):
        asked.append(device)
        real(self, weights, "cpu")

    monkeypatch.setattr(torch_engine.TorchModel, "__init__", stand_in)
    monkeypatch.delenv("NACRITH_EXACT_IMPL", raising=False)
    from nacrith.predictors.ensemble import PRESETS

    chosen = {"model alone": {}, "default": {"ensemble": pipeline.Settings().ensemble}, "v5": {"ensemble": PRESETS["v5"]}}[ensemble]
    options = dict(OPTIONS, streams=3, **chosen)
    on_cpu = pipeline.compress(TEXT, model=str(tiny_model), **options)
    assert asked == []  # the C kernel
    assert pipeline.compress(TEXT, model=str(tiny_model), gpu=True, **options) == on_cpu
    assert pipeline.decompress(on_cpu, model=str(tiny_model), gpu_ids=()) == TEXT
    assert asked == ["cuda:0", "cuda:0"]  # compressing and decoding asked for the GPU


def test_the_plan_takes_gpus_of_any_model_for_the_exact_engine(monkeypatch):
    from nacrith import workers
    from nacrith.errors import EngineError
    from nacrith.exact import torch_engine

    fake = [torch_engine.CudaDevice(0, "H200", "H200", 100 << 30, 140 << 30), torch_engine.CudaDevice(1, "A100", "A100", 70 << 30, 80 << 30)]
    monkeypatch.setattr(torch_engine, "cuda_devices", lambda: fake)
    plan = workers.plan_workers("auto", gpu=True, streams=256, ctx=1024, engine="exact")
    assert plan.devices == (0, 1) and plan.gpu_model is None
    plan = workers.plan_workers(3, gpu=True, streams=256, ctx=1024, engine="exact", gpu_ids=(1,))
    assert plan.devices == (1, 1, 1)
    monkeypatch.setattr(torch_engine, "cuda_devices", lambda: fake[:1])
    with pytest.raises(EngineError, match="no GPU visible to PyTorch among"):
        workers.plan_workers(1, gpu=True, streams=256, ctx=1024, engine="exact", gpu_ids=(1,))
