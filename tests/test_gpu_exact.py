"""The exact engine on a GPU (skipped where PyTorch sees no CUDA GPU; run by bench/gpu.sh on
the GPU machine): the GPU computes the CPU's integers, so containers made on either are the
same bytes and decode on the other, with the model alone (the distribution and the range
decoder's search on the GPU), with the default ensemble (logits copied to the host) and with
preset v5 (the integer ensemble's rows and learning on the GPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import nacrith
from nacrith import container as fmt

torch = pytest.importorskip("torch", reason="PyTorch is the exact engine's GPU extra")
pytestmark = [pytest.mark.gpu, pytest.mark.model, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")]

CORPUS = Path(os.environ.get("NACRITH_CORPORA", Path(__file__).resolve().parent.parent / "corpora" / "data"))
LAYOUT = dict(streams=64, min_stream_tokens=32, ctx=256, slide=64, block_size=3_000, fallback=False, engine="exact")


def text(size: int) -> bytes:
    path = CORPUS / "alice29.txt"
    return path.read_bytes()[:size] if path.exists() else (b"The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]


@pytest.mark.parametrize("ensemble", ["model alone", "default", "v5"])
def test_gpu_and_cpu_make_the_same_container_and_decode_each_other_s(ensemble):
    from nacrith.predictors.ensemble import PRESETS

    data = text(6_000)
    options = dict(LAYOUT, **({"ensemble": None} if ensemble == "model alone" else {"ensemble": PRESETS["v5"]} if ensemble == "v5" else {}))
    on_gpu = nacrith.compress(data, gpu=True, **options)
    on_cpu = nacrith.compress(data, **options)
    assert on_gpu == on_cpu
    assert fmt.parse(on_gpu).header.model.backend == "any"
    assert nacrith.decompress(on_gpu) == data  # on the CPU
    assert nacrith.decompress(on_cpu, gpu_ids=()) == data  # on the GPU
    assert nacrith.decompress(on_cpu, gpu_ids=(), workers=2) == data


def test_the_triton_decoder_compiled_is_the_numpy_decoder():
    from .test_device_rows import TRITON_CHECK, _interpreted

    result = _interpreted(TRITON_CHECK, TRITON_INTERPRET="0", CHECK_DEVICE="cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton decoder ok" in result.stdout


def test_the_fused_step_kernels_compiled_give_the_same_integers(tmp_path):
    from .test_triton_step import KERNELS, STEP, _run

    for code, args, said in ((KERNELS, (), "kernels ok"), (STEP, (str(tmp_path / "tiny.gguf"), "72", "80", "16"), "step ok")):
        result = _run(code, *args, TRITON_INTERPRET="0", CHECK_DEVICE="cuda")
        assert result.returncode == 0, result.stderr[-3000:]
        assert said in result.stdout
