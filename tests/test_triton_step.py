"""The fused Triton kernels of the PyTorch step (nacrith.exact.triton_step), run on the CPU in
Triton's interpreter (TRITON_INTERPRET=1): each kernel gives the tensor operations'
integers, and a whole step with them the C kernel's (or the reference's) logits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="PyTorch is the exact engine's GPU extra (make test installs its CPU build)")
pytest.importorskip("triton", reason="Triton is not installed (make test installs it)")

ROOT = Path(__file__).resolve().parent.parent

KERNELS = r"""
import os, numpy as np, torch
from nacrith.exact import triton_step as T
from nacrith.exact import torch_engine as E
device = os.environ.get("CHECK_DEVICE", "cpu")
rng = np.random.default_rng(4)
for n in (64, 576, 1536):
    x = rng.integers(-(1 << 30), 1 << 30, size=(9, n))
    x[1] = 0
    x[2] = rng.integers(-3, 4, n)
    x[3, 5] = (1 << 31) - 1
    x[4] >>= 20
    x = torch.as_tensor(x, device=device)
    for bits in (7, 13):
        q, t = T.quantize(torch, x, bits)
        q0, t0 = E.quantize(torch, x, bits)
        assert torch.equal(q, q0) and torch.equal(t, t0), ("quantize", n, bits)
    q, t = T.quantize(torch, x.view(3, 3, n), 13)
    assert torch.equal(q, E.quantize(torch, x.view(3, 3, n), 13)[0])
    gain = torch.as_tensor(rng.integers(-(1 << 14), 1 << 14, n), device=device)
    for eps_m, eps_e in ((13421773, -47), (0, 0), (1, -200)):
        class Model: pass
        model = Model(); model.eps_m, model.eps_e = eps_m, eps_e
        context = E.TorchContext.__new__(E.TorchContext)
        context.torch, context.model, context.fused = torch, model, None
        q0, t0 = context._norm_quantize(x, (gain, 15))
        q, t = T.norm_quantize(torch, x, gain, 15, eps_m, eps_e)
        assert torch.equal(q, q0) and torch.equal(t, t0), ("norm", n, eps_m)
    hi = torch.as_tensor(rng.integers(-(1 << 20), 1 << 20, size=(19, n)), dtype=torch.int32, device=device)
    lo = torch.as_tensor(rng.integers(-(1 << 20), 1 << 20, size=(19, n)), dtype=torch.int32, device=device)
    m = torch.as_tensor(rng.integers(1 << 14, 1 << 15, n), device=device)
    e = torch.as_tensor(rng.integers(-40, 10, n), device=device)
    k = torch.as_tensor(rng.integers(-30, 5, 19), device=device)
    expected = E.sat32(torch, E.rnd(torch, (128 * hi.long() + lo.long()) * m, e - k.unsqueeze(1) - 14))
    assert torch.equal(T.matmul_epilogue(torch, hi, lo, m, e, k), expected), ("epilogue", n)
    residual = torch.as_tensor(rng.integers(-(1 << 31) + 1, 1 << 31, size=(19, n)), device=device)
    assert torch.equal(T.matmul_epilogue(torch, hi, lo, m, e, k, residual), E.sat32(torch, residual + expected)), ("residual", n)
    q = torch.as_tensor(rng.integers(-8191, 8192, size=(5, n)), device=device)
    hi8, lo8 = T.split(torch, q, 17)
    assert hi8.shape == (17, n) and not hi8[5:].any() and not lo8[5:].any()
    assert torch.equal(hi8[:5].long() * 128 + lo8[:5].long(), q), ("split", n)
    gate = torch.as_tensor(rng.integers(-(1 << 20), 1 << 20, size=(6, n)), device=device)
    gate[0, :3] = torch.as_tensor([1 << 30, -(1 << 30), 0])
    up = torch.as_tensor(rng.integers(-(1 << 18), 1 << 18, size=(6, n)), device=device)
    from nacrith.exact import tables
    sigmoid = torch.as_tensor(tables.sigmoid_table(), dtype=torch.int64, device=device)
    index = torch.clamp(E.rnd(torch, gate, 14 - tables.SIGMOID_STEP_BITS), -tables.SIGMOID_RANGE, tables.SIGMOID_RANGE)
    silu = E.rnd(torch, gate * sigmoid[index + tables.SIGMOID_RANGE], 30)
    q0, t0 = E.quantize(torch, silu * up, 13)
    q1, t1 = T.silu_quantize(torch, gate, up, sigmoid)
    assert torch.equal(q0, q1) and torch.equal(t0, t1), ("silu", n)
for heads, head_dim, n_rot in ((9, 64, 64), (3, 16, 8)):
    x = torch.as_tensor(rng.integers(-(1 << 31), 1 << 31, size=(7, heads, head_dim)), device=device)
    cos = torch.as_tensor(rng.integers(-(1 << 30), 1 << 30, size=(7, 1, n_rot // 2)), device=device)
    sin = torch.as_tensor(rng.integers(-(1 << 30), 1 << 30, size=(7, 1, n_rot // 2)), device=device)
    class H: pass
    context = E.TorchContext.__new__(E.TorchContext)
    context.torch, context.h = torch, H()
    context.h.n_rot = n_rot
    assert torch.equal(T.rope(torch, x, cos, sin), context._rope(x, cos, sin)), ("rope", head_dim, n_rot)
print("kernels ok")
"""

STEP = r"""
import hashlib, os, sys, numpy as np, torch
from nacrith.exact import kernel, reference, tiny
from nacrith.exact import weights as W
from nacrith.exact import triton_step
from nacrith.exact.torch_engine import TorchContext, TorchModel
device = os.environ.get("CHECK_DEVICE", "cpu")
triton_step.ATTEND_CELLS = int(os.environ.get("ATTEND_CELLS", triton_step.ATTEND_CELLS))
weights = W.load(tiny.write_tiny_llama(sys.argv[1], seed=3))
CTX, STEPS, SLIDE = (int(value) for value in sys.argv[2:5])
def run(context, streams=3, steps=STEPS, ctx=CTX, slide=SLIDE):
    digest, position = hashlib.sha256(), 0
    context.reset()
    for step in range(steps):
        if position == ctx:
            for stream in range(streams):
                context.slide(stream, 1, slide, ctx)
            position -= slide
        tokens = (np.arange(streams) * 31 + step * 17) % weights.hyper.n_vocab
        digest.update(np.ascontiguousarray(context.step(tokens, np.full(streams, position)), np.int64).tobytes())
        position += 1
    return digest.hexdigest()
fused = TorchContext(TorchModel(weights, device), 3, CTX)
assert fused.fused is not None, "the fused kernels are not on"
expected = run(kernel.KernelContext(kernel.KernelModel(weights), 3, CTX, 1) if kernel.available() else reference.ReferenceContext(weights, 3, CTX))
got = run(fused)
assert got == expected, (got, expected)
print("step ok")
"""


def _run(code: str, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1", "NACRITH_EXACT_TRITON": "1", "PYTHONPATH": str(ROOT), **env})


def test_each_fused_kernel_gives_the_tensor_operations_integers():
    result = _run(KERNELS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels ok" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("window, cells", [((16, 20, 4), 32), ((20, 26, 4), 8)], ids=["one block of cells", "three blocks of cells"])
def test_a_step_with_the_fused_kernels_gives_the_c_kernel_s_logits(tmp_path, window, cells):
    result = _run(STEP, str(tmp_path / "tiny.gguf"), *map(str, window), ATTEND_CELLS=str(cells))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step ok" in result.stdout


def test_the_fused_kernels_are_off_unless_asked(monkeypatch):
    import torch

    from nacrith.exact import triton_step

    monkeypatch.delenv("NACRITH_EXACT_TRITON", raising=False)
    assert not triton_step.enabled(torch.device("cpu")) and not triton_step.enabled(torch.device("cuda"))
    monkeypatch.setenv("NACRITH_EXACT_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_step.enabled(torch.device("cpu")) and triton_step.enabled(torch.device("cuda"))


PIPELINE = r"""
import os, sys
from nacrith import pipeline
from nacrith.exact import tiny
model = str(tiny.write_tiny_llama(sys.argv[1], seed=3))
text = b"the rain in spain stays mainly in the plain; the hen is in the inn. "
options = dict(model=model, ctx=16, slide=4, min_stream_tokens=8, fallback=False, engine="exact", streams=3, ensemble=None)
os.environ["NACRITH_EXACT_IMPL"] = "simd" if os.environ.get("HAVE_KERNEL") == "1" else "reference"
expected = pipeline.compress(text, **options)
os.environ["NACRITH_EXACT_IMPL"] = "torch"  # the fused step, the device rows and the Triton decoder
made = pipeline.compress(text, **options)
assert made == expected, "another container"
assert pipeline.decompress(made, model=model) == text
print("pipeline ok")
"""


@pytest.mark.slow
def test_the_model_alone_through_every_kernel_makes_the_c_kernel_s_container(tmp_path):
    from nacrith.exact import kernel

    result = _run(PIPELINE, str(tmp_path / "tiny.gguf"), HAVE_KERNEL="1" if kernel.available() else "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline ok" in result.stdout
