"""GPU behaviour (skipped where llama.cpp sees no GPU; run by bench/gpu.sh on the GPU machine).

On CUDA a stream's logits depend on its batch companions, so a container records its
stream layout and decoding replays it; these tests check that decoding is exact with any
worker count, and that a GPU-made file is refused up front where no GPU is visible.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nacrith
from nacrith import container as fmt
from nacrith import pipeline
from nacrith.devices import gpus
from nacrith.errors import BackendMismatchError, ContainerError

pytestmark = [pytest.mark.gpu, pytest.mark.model, pytest.mark.skipif(not gpus(), reason="no GPU visible to llama.cpp")]

CORPUS = Path(os.environ.get("NACRITH_CORPORA", Path(__file__).resolve().parent.parent / "corpora" / "data"))


def text(size: int) -> bytes:
    path = CORPUS / "alice29.txt"
    return path.read_bytes()[:size] if path.exists() else (b"The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]


def test_gpu_roundtrip_any_worker_count():
    data = text(60_000)
    blob = nacrith.compress(data, gpu=True, streams=64, min_stream_tokens=32, block_size=20_000, fallback=False, workers=2)
    parsed = fmt.parse(blob)
    assert parsed.header.model.backend == f"cuda:{gpus()[0].description}" and len(parsed.blocks) == 3
    for workers in (1, 3, "1x3", "2x2"):
        assert nacrith.decompress(blob, workers=workers) == data
    assert nacrith.compress(data, gpu=True, streams=64, min_stream_tokens=32, block_size=20_000, fallback=False, workers="1x3") == blob


def test_cpu_file_decodes_on_cpu_even_with_a_gpu():
    data = text(3_000)
    blob = nacrith.compress(data, fallback=False, streams=4, min_stream_tokens=32)
    section = fmt.parse(blob).header.model
    assert section.backend_kind == "cpu" and section.cpu_build is not None  # the CUDA build's CPU side, recorded
    assert nacrith.decompress(blob) == data


def test_gpu_file_refused_without_gpu(tmp_path):
    data = text(3_000)
    blob = nacrith.compress(data, gpu=True, fallback=False, streams=4, min_stream_tokens=32)
    path = tmp_path / "g.nc"
    path.write_bytes(blob)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "nacrith.cli", "-d", "-c", str(path)], capture_output=True, env=env, timeout=300)
    assert result.returncode == 1
    assert b"made on a CUDA GPU" in result.stderr and len(result.stderr.splitlines()) == 1


def test_file_of_another_gpu_model_refused_unless_any_gpu_model():
    data = text(3_000)
    blob = nacrith.compress(data, gpu=True, fallback=False, streams=4, min_stream_tokens=32)
    header, end = fmt.read_header(blob)
    relabelled = fmt.write_header(fmt.Header(fmt.ModelSection(**{**header.model.__dict__, "backend": "cuda:Another GPU"}))) + blob[end:]
    with pytest.raises(BackendMismatchError, match="made on a Another GPU GPU"):
        nacrith.decompress(relabelled)
    out = io.BytesIO()
    pipeline.decode_parsed(fmt.parse(relabelled), out, any_gpu_model=True)  # this GPU made it: exact
    assert out.getvalue() == data


def test_gpu_file_forced_onto_cpu_never_gives_wrong_bytes():
    """Finding, not policy: relabel a GPU file as CPU-made and decode it on the CPU."""
    data = text(3_000)
    blob = nacrith.compress(data, gpu=True, fallback=False, streams=4, min_stream_tokens=32)
    header, end = fmt.read_header(blob)
    relabelled = fmt.write_header(fmt.Header(fmt.ModelSection(**{**header.model.__dict__, "backend": "cpu"}))) + blob[end:]
    try:
        restored = nacrith.decompress(relabelled)
    except ContainerError as exc:
        print(f"\nGPU file decoded on the CPU: refused after decoding ({exc})")
        return
    assert restored == data
    print("\nGPU file decoded on the CPU: exact")
