"""The default model's Q4_1 weights rewritten as Q8_0 (nacrith.requantize), and the zoo
entry made from it on first use (nacrith.model)."""
from __future__ import annotations

import ctypes
import hashlib
import io
import struct
from dataclasses import replace

import numpy as np
import pytest

from nacrith import model as model_files
from nacrith import requantize
from nacrith.errors import ModelNotFoundError

from .conftest import pinned_smollm2

Q8_NAME = "smollm2-135m-q8"


def gguf_file(tensors: list[tuple[bytes, tuple[int, ...], int, bytes]], alignment: int = 32) -> bytes:
    """A GGUF v3 file of two keys (file type Q4_1, ``alignment``) and ``tensors``: (name, dims, ggml type, data)."""
    def key(name: bytes, value: int) -> bytes:
        return struct.pack("<Q", len(name)) + name + struct.pack("<II", 4, value)

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2))
    out += key(b"general.file_type", 3) + key(b"general.alignment", alignment)
    offset = 0
    for name, dims, kind, data in tensors:
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, offset)
        offset += len(data) + (-len(data)) % alignment
    out += bytes((-len(out)) % alignment)
    for _, _, _, data in tensors:
        out += data + bytes((-len(data)) % alignment)
    return bytes(out)


def q4_1_blocks(scales: list[float], lows: list[float], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = np.zeros(len(scales), requantize.Q4_1_BLOCK)
    blocks["d"], blocks["m"] = scales, lows
    blocks["qs"] = rng.integers(0, 256, (len(scales), 16))
    return blocks.tobytes()


def test_roundf_rounds_halves_away_from_zero():
    values = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -126.5, 3.25, -0.0], np.float32)
    assert requantize._roundf(values).tolist() == [1, 2, 3, -1, -3, 0, -127, 3, 0]


def test_q4_1_blocks_become_q8_0_blocks_of_nearly_the_same_weights():
    raw = q4_1_blocks([0.5, 0.013, 0.0, 2.0], [-2.0, 0.1, 0.0, -30.0])
    q4 = np.frombuffer(raw, requantize.Q4_1_BLOCK)
    weights = np.concatenate([q4["qs"] & 15, q4["qs"] >> 4], axis=1) * q4["d"].astype(np.float64)[:, None] + q4["m"].astype(np.float64)[:, None]
    q8 = np.frombuffer(requantize.q4_1_to_q8_0(raw), requantize.Q8_0_BLOCK)
    restored = q8["qs"] * q8["d"].astype(np.float64)[:, None]
    step = np.abs(weights).max(axis=1) / 127
    assert np.all(np.abs(restored - weights).max(axis=1) <= step * 0.51 + np.abs(weights).max(axis=1) * 2e-3)
    assert np.abs(q8["qs"][[0, 1, 3]]).max(axis=1).tolist() == [127, 127, 127]  # the largest weight uses the whole range
    assert not q8["qs"][2].any() and q8["d"][2] == 0  # an all-zero block stays zero (no division by zero)


def test_rewrite_keeps_keys_shapes_and_other_tensors(tmp_path):
    q4 = q4_1_blocks([0.25, 0.5, 1.0, 0.125], [0.0, -1.0, 2.0, -3.0])
    norm = np.arange(40, dtype=np.float32).tobytes()
    source = gguf_file([(b"norm.weight", (40,), 0, norm), (b"blk.0.w", (64, 2), 3, q4)], alignment=64)
    out = io.BytesIO()
    requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source), out)
    layout = requantize.read_layout(io.BytesIO(out.getvalue()))
    assert [(t.name, t.dims, t.kind) for t in layout.tensors] == [(b"norm.weight", (40,), 0), (b"blk.0.w", (64, 2), 8)]
    assert struct.unpack_from("<I", layout.keys, layout.file_type_at)[0] == requantize.FILE_TYPE_Q8_0
    assert layout.alignment == 64 and layout.data_start % 64 == 0 and all(t.offset % 64 == 0 for t in layout.tensors)
    data = out.getvalue()[layout.data_start:]
    assert data[:len(norm)] == norm
    assert data[layout.tensors[1].offset:][:4 * 34] == requantize.q4_1_to_q8_0(q4)
    assert len(data) == layout.tensors[1].offset + 4 * 34 + (-4 * 34) % 64


def test_rewrite_refuses_a_tensor_type_it_cannot_size():
    source = gguf_file([(b"odd", (32,), 99, bytes(64))])
    with pytest.raises(requantize.GGUFFormatError, match="tensor type 99"):
        requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source), io.BytesIO())


@pytest.mark.slow
def test_rewrite_of_the_default_model_has_llama_cpps_own_q8_0_weights(tmp_path):
    """The same tensors, byte for byte, as llama.cpp's quantizer makes of the file (which
    orders keys and tensors its own way, so the files as a whole differ)."""
    import llama_cpp

    source = pinned_smollm2()
    theirs = tmp_path / "llama.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = 7, True  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours = io.BytesIO()
    with open(source, "rb") as handle:
        requantize.rewrite_q4_1_as_q8_0(handle, ours)
    with open(theirs, "rb") as handle:
        their_layout, their_bytes = requantize.read_layout(handle), theirs.read_bytes()
    our_layout, our_bytes = requantize.read_layout(io.BytesIO(ours.getvalue())), ours.getvalue()
    their_tensors = {tensor.name: tensor for tensor in their_layout.tensors}
    assert sorted(their_tensors) == sorted(tensor.name for tensor in our_layout.tensors)
    for tensor in our_layout.tensors:
        other = their_tensors[tensor.name]
        assert (tensor.dims, tensor.kind) == (other.dims, other.kind)
        mine = our_bytes[our_layout.data_start + tensor.offset:][:tensor.nbytes()]
        assert mine == their_bytes[their_layout.data_start + other.offset:][:other.nbytes()], tensor.name


def test_default_model_is_made_once_with_its_pinned_digest(tmp_path, monkeypatch):
    pinned_smollm2()
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path))
    path = model_files.resolve_model_path(Q8_NAME)  # zoo_path refuses any other digest
    assert path.parent == tmp_path / "models" and model_files.fingerprint(path).hex() == model_files.ZOO[Q8_NAME].sha256
    made = path.stat().st_mtime_ns
    assert model_files.resolve_model_path(Q8_NAME) == path and path.stat().st_mtime_ns == made
    assert model_files.zoo_model_of(bytes.fromhex(model_files.ZOO[Q8_NAME].sha256)).name == Q8_NAME


def test_derived_zoo_model_checks_its_source_and_its_result(tmp_path, monkeypatch):
    """A fake source package: rewritten once into the cache; a source of another version,
    a wrong pin or an unwritable cache is a one-line error that leaves nothing behind."""
    source_bytes = gguf_file([(b"w", (32, 2), 3, q4_1_blocks([0.5, 1.0], [0.0, -1.0]))])
    package = tmp_path / "site" / "nacrith_fake_q4"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "fake.gguf").write_bytes(source_bytes)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path / "cache"))
    expected = io.BytesIO()
    requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source_bytes), expected)
    source = model_files.ZooModel("fake-q4", "fake.gguf", hashlib.sha256(source_bytes).hexdigest(), "fake-q4", "make install-fake",
                                  (("nacrith_fake_q4", "fake.gguf"),))
    derived = model_files.ZooModel("fake-q8", "fake-q8.gguf", hashlib.sha256(expected.getvalue()).hexdigest(), "fake-q4",
                                   "make install-fake", source.parts, derived_from="fake-q4")
    monkeypatch.setitem(model_files.ZOO, "fake-q4", source)
    monkeypatch.setitem(model_files.ZOO, "fake-q8", derived)
    cache = tmp_path / "cache" / "models"

    path = model_files.resolve_model_path("fake-q8")
    assert path == cache / "fake-q8.gguf" and path.read_bytes() == expected.getvalue()
    made = path.stat().st_mtime_ns
    assert model_files.resolve_model_path("fake-q8") == path and path.stat().st_mtime_ns == made

    path.unlink()
    monkeypatch.setitem(model_files.ZOO, "fake-q8", replace(derived, sha256="00" * 32))
    with pytest.raises(ModelNotFoundError, match=r"fake-q4 rewritten as fake-q8 does not give its SHA-256 \(.*make install-fake"):
        model_files.resolve_model_path("fake-q8")
    assert list(cache.iterdir()) == []

    monkeypatch.setitem(model_files.ZOO, "fake-q8", derived)
    monkeypatch.setitem(model_files.ZOO, "fake-q4", replace(source, sha256="11" * 32))  # another version installed
    with pytest.raises(ModelNotFoundError, match="the installed fake-q4 is not the version nacrith pins .*make install-fake"):
        model_files.resolve_model_path("fake-q8")
    assert list(cache.iterdir()) == []

    monkeypatch.setitem(model_files.ZOO, "fake-q4", source)
    (tmp_path / "blocked").write_bytes(b"")
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path / "blocked"))
    with pytest.raises(ModelNotFoundError, match="cannot write fake-q8, made from fake-q4, into .*blocked/models .*set NACRITH_CACHE"):
        model_files.resolve_model_path("fake-q8")

    monkeypatch.setitem(model_files.ZOO, "fake-q4", replace(source, parts=(("nacrith_fake_absent", "x.gguf"),)))
    monkeypatch.setitem(model_files.ZOO, "fake-q8", replace(derived, parts=(("nacrith_fake_absent", "x.gguf"),)))
    with pytest.raises(ModelNotFoundError, match="model fake-q8 is not installed; install it with `make install-fake`"):
        model_files.resolve_model_path("fake-q8")


@pytest.mark.slow
def test_a_session_of_another_model_is_not_used_for_a_file(session):
    """The test suite's shared session runs the default model. Compressing with another
    ``model`` and that session, and decoding that file with it, load the other model
    instead: before, the header named one model while the session's coded the tokens, and
    decoding failed its checksum."""
    pinned_smollm2()
    from nacrith import container as fmt
    from nacrith import pipeline

    other = next(name for name in ("smollm2-135m", Q8_NAME) if model_files.ZOO[name].sha256 != session.info.sha256.hex())
    data = b"The rewritten weights are the same model, run faster. " * 8
    packed = io.BytesIO()
    settings = pipeline.Settings(model=other, streams=2, min_stream_tokens=16, fallback=False)
    pipeline.compress_stream(io.BytesIO(data), packed, settings, session=session)
    blob = packed.getvalue()
    assert fmt.parse(blob).header.model.sha256.hex() == model_files.ZOO[other].sha256
    assert blob == pipeline.compress(data, model=other, streams=2, min_stream_tokens=16, fallback=False)
    out = io.BytesIO()
    pipeline.decompress_to(blob, out, session=session)
    assert out.getvalue() == data


def test_tensor_data_is_copied_in_pieces_of_whole_blocks(monkeypatch):
    """Pieces of two blocks write the same bytes as one read of the whole tensor; a tensor
    whose data ends early is a GGUFFormatError."""
    q4 = q4_1_blocks([0.25, 0.5, 1.0, 0.125, 3.0], [0.0, -1.0, 2.0, -3.0, 0.5])
    norm = np.arange(37, dtype=np.float32).tobytes()
    source = gguf_file([(b"norm.weight", (37,), 0, norm), (b"blk.0.w", (32, 5), 3, q4)])
    whole = io.BytesIO()
    requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source), whole)
    monkeypatch.setattr(requantize, "COPY_BYTES", 2 * requantize.Q4_1_BLOCK.itemsize)
    pieces = io.BytesIO()
    requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source), pieces)
    assert pieces.getvalue() == whole.getvalue()
    with pytest.raises(requantize.GGUFFormatError, match="truncated GGUF tensor data"):
        requantize.rewrite_q4_1_as_q8_0(io.BytesIO(source[:-40]), io.BytesIO())


class _ZerosAfter(io.RawIOBase):
    """A readable, seekable file: ``head``, then zeros up to ``size`` bytes in all."""

    def __init__(self, head: bytes, size: int):
        self.head, self.size, self.at = head, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = offset if whence == io.SEEK_SET else self.at + offset
        return self.at

    def tell(self) -> int:
        return self.at

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.at))
        head = self.head[self.at:self.at + count]
        buffer[:len(head)] = head
        buffer[len(head):count] = bytes(count - len(head))
        self.at += count
        return count


class _CountingSink(io.RawIOBase):
    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def test_a_tensor_larger_than_one_header_read_is_copied():
    """A 280 MB f32 tensor: more than gguf.read_exact allows in one read (256 MiB), which the
    rewrite used to refuse as an implausible size."""
    weights = 70_000_000
    head = gguf_file([(b"big", (weights,), 0, b"")])
    source = _ZerosAfter(head, len(head) + 4 * weights)
    sink = _CountingSink()
    requantize.rewrite_q4_1_as_q8_0(source, sink)
    assert sink.count == len(head) + 4 * weights
