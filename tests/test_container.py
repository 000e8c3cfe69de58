"""The container refuses anything it cannot decode exactly, before model work where it can."""
from __future__ import annotations

import io
import os
from dataclasses import replace

import pytest

from nacrith import container as fmt
from nacrith import compat, pipeline, reuse
from nacrith.attention import default_attention
from nacrith.errors import (
    BackendMismatchError,
    ContainerError,
    CorruptError,
    ModelMismatchError,
    NotNacrithError,
    TruncatedError,
    UnsupportedVersionError,
)

from .conftest import SMALL, pack, pinned_smollm2, sparse_binary, unpack


@pytest.fixture(scope="module")
def session(llama_session):
    """This module's tests are of llama.cpp's records (backends, CPU builds, attention modes)."""
    return llama_session

TEXT = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 2
MIXED = TEXT + bytes(range(256)) * 2 + TEXT


@pytest.fixture(scope="module")
def model_blob(session):
    blob = pack(session, MIXED, fallback=False, **SMALL)
    parsed = fmt.parse(blob)
    assert parsed.blocks[0].kind == fmt.MODEL and parsed.blocks[0].binary_length > 0
    return blob


def regions(blob: bytes) -> dict[str, range]:
    """Byte ranges of each part of a one-block container."""
    _, header_end = fmt.read_header(blob)
    block, block_end = fmt.read_block(blob, header_end)
    payload_start = block_end - len(block.payload)
    return {
        "header": range(0, header_end),
        "block header": range(header_end, payload_start),
        "binary payload": range(payload_start, payload_start + block.binary_length),
        "coded payload": range(payload_start + block.binary_length, block_end),
        "trailer": range(block_end, len(blob)),
    }


def test_parse_roundtrip(model_blob):
    parsed = fmt.parse(model_blob)
    assert parsed.trailer.total_length == len(MIXED)
    assert parsed.header.model.ctx == SMALL["ctx"]
    assert parsed.trailer.checksum == fmt.checksum(MIXED)


def test_every_byte_corrupted_is_an_error(session, model_blob):
    """Flip each byte in turn (every region): always a ContainerError, never other bytes."""
    seen = set()
    for name, span in regions(model_blob).items():
        assert len(span) > 0, name
        for offset in span:
            damaged = bytearray(model_blob)
            damaged[offset] ^= 0x5A
            with pytest.raises(ContainerError):
                unpack(session, bytes(damaged))
            seen.add(name)
    assert len(seen) == 5


def test_every_truncation_is_an_error(session, model_blob):
    for length in range(len(model_blob)):
        with pytest.raises(ContainerError):
            unpack(session, model_blob[:length])


def test_appended_bytes_are_an_error(session, model_blob):
    with pytest.raises(CorruptError):
        unpack(session, model_blob + b"\0")


def test_not_nacrith(session):
    with pytest.raises(NotNacrithError):
        unpack(session, b"PK\x03\x04 not ours")


def reheader(blob: bytes, **changes) -> bytes:
    """The container with its header rewritten (valid CRC) with some model fields changed."""
    header, end = fmt.read_header(blob)
    section = fmt.ModelSection(**{**header.model.__dict__, **changes})
    return fmt.write_header(fmt.Header(section)) + blob[end:]


def test_unknown_version(session, model_blob):
    damaged = bytearray(model_blob)
    damaged[4] = 9  # the version is checked before the header CRC
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        unpack(session, bytes(damaged))


def as_legacy(blob: bytes, version: int) -> bytes:
    """``blob`` with its header rewritten in the version 1, 2 (no attention field), 3 (no
    coder field) or 4 layout (plain strings and SHA-256, no tables)."""
    import zlib

    header, header_end = fmt.read_header(blob)
    body = bytearray()
    fmt.put_varint(body, 1 if header.model else 0)
    if header.model:
        model = header.model
        assert version >= 3 or model.attention == fmt.LEGACY_ATTENTION, "versions 1 and 2 were made with attention auto"
        assert version >= 4 or model.coder == fmt.LEGACY_CODER, "versions 1 to 3 were coded by constriction"
        body += model.sha256
        for text in (model.name, model.engine, model.backend):
            fmt.put_str(body, text)
        if version >= 3:
            body.append(fmt.ATTENTION_CODES.index(model.attention))
        fmt.put_varint(body, model.ctx)
        fmt.put_varint(body, model.slide)
        fmt.put_str(body, fmt.predictor_json(model.predictor))
        if version >= 4:
            fmt.put_str(body, model.coder)
    out = bytearray(fmt.MAGIC) + bytes([version])
    fmt.put_varint(out, len(body))
    out += body
    fmt.put_u32(out, zlib.crc32(out))
    return bytes(out) + blob[header_end:]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_old_versions_still_decode(session, version):
    """Files from before the attention field were made with llama.cpp's "auto" attention; before
    the coder field, with constriction's coder."""
    made = pack(session, TEXT, fallback=False, attention="auto", coder="constriction", **SMALL)  # text only: nothing version 1 lacked
    old = as_legacy(made, version)
    assert fmt.parse(old).header.version == version
    assert fmt.parse(old).header.model.attention == "auto"
    assert fmt.parse(old).header.model.coder == "constriction"
    assert unpack(session, old) == TEXT


def test_version_4_files_still_decode(session, model_blob):
    """Version 5 only changed how the model section is written: a version 4 header of the
    same section (162 bytes with the default model, where version 5 takes 22) reads the same."""
    old = as_legacy(model_blob, 4)
    assert fmt.parse(old).header == replace(fmt.parse(model_blob).header, version=4)
    assert len(old) - len(model_blob) == fmt.read_header(old)[1] - fmt.read_header(model_blob)[1] > 100
    assert unpack(session, old) == MIXED


def test_header_tables_are_append_only_and_cover_the_defaults():
    """Files name table entries by position: the entries written so far never change."""
    from nacrith.model import ZOO
    from nacrith.predictors import predictor_settings
    from nacrith.session import engine_name

    written = {  # entries as files of version 5 use them: only appending is allowed
        "model_sha256": ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                         "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        "model_name": ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"),
        "engine": ("llama.cpp (llama-cpp-python 0.3.36)",),
        "backend": ("cpu", "cuda", "cpu:x86_64/520000f7"),
        "predictor": ('{"ensemble":"v4","llm":"exp2-q64"}', '{"llm":"exp2-q64"}'),
        "coder": ("int24", "constriction"),
    }
    assert set(fmt.TABLES) == set(written)
    for field, entries in written.items():
        assert fmt.TABLES[field][: len(entries)] == entries, field
    # what a default file writes is in the tables (else it is written out: larger, still right)
    assert {model.sha256 for model in ZOO.values()} <= set(fmt.TABLES["model_sha256"])
    assert {model.file for model in ZOO.values()} <= set(fmt.TABLES["model_name"])
    assert engine_name() in fmt.TABLES["engine"]
    assert fmt.predictor_json(pipeline.Settings().predictor) in fmt.TABLES["predictor"]
    assert fmt.predictor_json(predictor_settings(None)) in fmt.TABLES["predictor"]


def test_strings_outside_the_tables_are_written_out(session):
    section = fmt.ModelSection(b"\x07" * 32, "mine.gguf", "llama.cpp (llama-cpp-python 9.9)", "cuda:NVIDIA H100 80GB HBM3", 512, 128,
                               {"ensemble": "v4", "llm": "exp2-q64", "set": {"match": False}}, "on", "constriction")
    blob = fmt.write_header(fmt.Header(section))
    assert fmt.read_header(blob)[0] == fmt.Header(section)
    damaged = bytearray(fmt.write_header(fmt.Header(replace(section, engine=fmt.TABLES["engine"][0]))))
    engine_at = damaged.index(b"mine.gguf") + len(b"mine.gguf")
    assert damaged[engine_at] == 1  # entry 1 of the engine table
    damaged[engine_at] = 99
    import struct
    import zlib

    damaged[-4:] = struct.pack("<I", zlib.crc32(bytes(damaged[:-4])))
    with pytest.raises(UnsupportedVersionError, match="engine entry 99, which this nacrith does not know"):
        fmt.read_header(bytes(damaged))


def test_coder_is_recorded_and_both_decode(session):
    """New files use the int24 coder; constriction-coded files (the older coder) still decode."""
    made = pack(session, TEXT, fallback=False, **SMALL)
    assert fmt.parse(made).header.version == 5 and fmt.parse(made).header.model.coder == "int24"
    other = pack(session, TEXT, fallback=False, coder="constriction", **SMALL)
    assert fmt.parse(other).header.model.coder == "constriction"
    assert unpack(session, made) == TEXT and unpack(session, other) == TEXT
    # the same probabilities, coded two ways: sizes within a few bytes, bytes different
    assert made != other and abs(len(made) - len(other)) <= 16


def test_unknown_coder_is_refused(session, model_blob):
    with pytest.raises(UnsupportedVersionError, match="range coder"):
        unpack(session, reheader(model_blob, coder="arith99"))


def test_attention_mode_is_recorded_and_a_wrong_one_is_caught(session):
    blob = pack(session, TEXT, fallback=False, **SMALL)
    assert fmt.parse(blob).header.model.attention == default_attention("cpu") == "off"
    with_auto = reheader(blob, attention="auto")  # same bits, other logits: must not pass silently
    try:
        restored = unpack(session, with_auto)
    except ContainerError:
        return
    assert restored == TEXT  # only if the two kernels happened to agree on every coded token


def test_unknown_attention_mode_is_refused(session, model_blob):
    import zlib

    legacy = as_legacy(model_blob, 4)  # its strings written out, to find the byte after them
    header, end = fmt.read_header(legacy)
    body = bytearray(legacy[: end - 4])
    at = body.index(header.model.backend.encode()) + len(header.model.backend)  # the attention byte follows
    assert body[at] == fmt.ATTENTION_CODES.index(header.model.attention)
    body[at] = 9
    forged = bytes(body) + zlib.crc32(body).to_bytes(4, "little") + legacy[end:]
    with pytest.raises(UnsupportedVersionError, match="attention"):
        unpack(session, forged)


def test_every_engine_attention_mode_has_a_code():
    from nacrith.attention import ATTENTION_MODES

    assert set(fmt.ATTENTION_CODES) == set(ATTENTION_MODES)


def test_xz_in_a_version_1_file_is_refused(session):
    blob = pack(session, sparse_binary(), coder="constriction")
    assert fmt.parse(blob).blocks[0].kind == fmt.XZ
    with pytest.raises(CorruptError, match="version 1"):
        unpack(session, as_legacy(blob, 1))


@pytest.mark.slow
def test_damage_behind_valid_crcs_is_caught(session, model_blob):
    """Coded bytes changed and every CRC recomputed: an error, or (if the bit was unused) the original."""
    _, header_end = fmt.read_header(model_blob)
    block, block_end = fmt.read_block(model_blob, header_end)
    coded = bytearray(block.coded)
    for position in (0, len(coded) // 2, len(coded) - 1):
        damaged = bytearray(coded)
        damaged[position] ^= 0x01
        forged = fmt.Block(**{**block.__dict__, "payload": bytes(block.binary_payload) + bytes(damaged)})
        blob = model_blob[:header_end] + fmt.write_block(forged) + model_blob[block_end:]
        try:
            restored = unpack(session, blob)
        except ContainerError:
            continue
        assert restored == MIXED


def test_wrong_model_is_refused_naming_both(session, model_blob):
    other = reheader(model_blob, sha256=b"\x11" * 32, name="other-model.gguf")
    with pytest.raises(ModelMismatchError, match="other-model.gguf.*SmolLM2"):
        unpack(session, other)


def test_decoding_finds_a_zoo_model_by_its_sha256(model_blob, tmp_path, monkeypatch):
    """NACRITH_MODEL names another model: the file's recorded SHA-256 still finds the default,
    a zoo model; an explicit --model of another model is refused with the zoo name as hint."""
    from nacrith import model as model_files
    from nacrith.errors import ModelNotFoundError

    pinned_smollm2()
    default = model_files.default_model_path()
    name = model_files.DEFAULT_MODEL
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the model")
    monkeypatch.setenv("NACRITH_MODEL", str(other))
    parsed = fmt.parse(model_blob)
    assert compat.check_decodable(parsed) == default
    with pytest.raises(ModelMismatchError, match=f"with --model {name}"):
        compat.check_decodable(parsed, str(other))
    # the recorded model known to the zoo but not installed (the package it is made from is
    # missing): say how to install it
    missing = replace(model_files.ZOO["smollm2-135m"], parts=(("nacrith_no_such_package", "x.gguf"),))
    monkeypatch.setitem(model_files.ZOO, "smollm2-135m", missing)
    with pytest.raises(ModelNotFoundError, match=f"nacrith's {name} model, which is not installed; install it with `make install`"):
        compat.check_decodable(parsed)


@pytest.mark.parametrize("gpu_backend", ["cuda", "cuda:NVIDIA H100 80GB HBM3"])
def test_other_backend_is_refused(session, model_blob, gpu_backend):
    from nacrith.engine import gpu_available

    other = reheader(model_blob, backend=gpu_backend)
    # without a GPU: refused up front; with one, this CPU session cannot replay GPU logits
    reason = "made on a CUDA GPU; this llama.cpp has (no GPU support|GPU support but sees no GPU)" if not gpu_available() else "the session runs on cpu"
    with pytest.raises(BackendMismatchError, match=reason):
        unpack(session, other)


def test_gpu_model_is_recorded_and_read():
    section = fmt.ModelSection(b"\x00" * 32, "m.gguf", "engine", "cuda:NVIDIA H100 80GB HBM3", 1024, 512)
    header, _ = fmt.read_header(fmt.write_header(fmt.Header(section)))
    assert header.model == section
    assert (header.model.backend_kind, header.model.gpu_model) == ("cuda", "NVIDIA H100 80GB HBM3")
    assert (replace(section, backend="cuda").backend_kind, replace(section, backend="cuda").gpu_model) == ("cuda", None)  # older files
    assert (replace(section, backend="cpu").backend_kind, replace(section, backend="cpu").gpu_model) == ("cpu", None)


def test_file_of_another_gpu_model_is_refused_before_any_output(session, model_blob, monkeypatch):
    """A file made on one GPU model, on a machine whose GPUs are another: refused before
    decoding (nothing written), unless any_gpu_model lets the machine's GPUs try."""
    from nacrith import devices, pipeline, workers

    gib = 1 << 30
    monkeypatch.setattr(pipeline, "check_decodable", lambda parsed, *options: None)  # as if this build had CUDA
    monkeypatch.setattr(devices, "gpus", lambda: [devices.Device(0, "CUDA0", "GPU B", 80 * gib, 80 * gib)])
    other = reheader(model_blob, backend="cuda:GPU A")
    out = io.BytesIO()
    with pytest.raises(BackendMismatchError, match="made on a GPU A GPU.*this machine has GPU B"):
        pipeline.decompress_to(other, out)
    assert out.getvalue() == b""
    planned = []

    def plan(*args, **kwargs):
        planned.append(args[9] if len(args) > 9 else kwargs.get("gpu_model"))
        raise RuntimeError("planned")
    monkeypatch.setattr(workers, "plan_workers", plan)
    with pytest.raises(RuntimeError, match="planned"):
        pipeline.decode_parsed(fmt.parse(other), out, any_gpu_model=True)
    with pytest.raises(RuntimeError, match="planned"):
        pipeline.decode_parsed(fmt.parse(other), out)
    with pytest.raises(RuntimeError, match="planned"):
        pipeline.decompress(other, any_gpu_model=True)  # the public API passes it on
    assert planned == [None, "GPU A", None]


@pytest.mark.slow
def test_the_cpu_build_is_recorded_and_another_is_refused_up_front(session, model_blob, tmp_path):
    """A CPU file records the llama.cpp CPU build that made it: a build of other features
    (whose logits differ: an AVX2 and an AVX-512 build each failed the other's files, at the
    end) refuses it before decoding, unless any_cpu_build; files that read "cpu" alone
    decode as before."""
    import subprocess
    import sys

    from nacrith.engine import cpu_build

    assert fmt.parse(model_blob).header.model.backend == f"cpu:{fmt.cpu_build_field(cpu_build())}"
    assert fmt.parse(model_blob).header.model.cpu_build == cpu_build()
    here = cpu_build()
    other = here.replace(" AVX2", "") + " AVX512 AVX512_VNNI"  # lacks AVX2, has AVX-512
    relabelled = reheader(model_blob, backend=f"cpu:{fmt.cpu_build_field(other)}")
    out = io.BytesIO()
    with pytest.raises(BackendMismatchError, match="this one lacks AVX512 AVX512_VNNI; it lacked AVX2.*--any-cpu-build"):
        pipeline.decompress_to(relabelled, out)
    assert out.getvalue() == b""
    with pytest.raises(BackendMismatchError, match="made by llama.cpp on aarch64 CPUs"):
        pipeline.decompress_to(reheader(model_blob, backend=f"cpu:{fmt.cpu_build_field('aarch64 NEON ARM_FMA')}"), out)
    pipeline.decompress_to(relabelled, out, any_cpu_build=True)  # truly this build: the checksum passes
    assert out.getvalue() == MIXED
    threading = here.replace(" OPENMP", "") if " OPENMP" in here else here + " OPENMP"  # the same arithmetic
    assert unpack(session, reheader(model_blob, backend=f"cpu:{fmt.cpu_build_field(threading)}")) == MIXED
    assert unpack(session, reheader(model_blob, backend="cpu")) == MIXED  # files of before, unchecked
    path = tmp_path / "other.nc"
    path.write_bytes(relabelled)
    command = [sys.executable, "-m", "nacrith.cli", "-d", "-c", str(path)]
    refused = subprocess.run(command, capture_output=True)
    assert refused.returncode == 1 and refused.stdout == b"" and refused.stderr.count(b"\n") == 1
    assert b"other features" in refused.stderr
    forced = subprocess.run([*command, "--any-cpu-build"], capture_output=True)
    assert forced.returncode == 0 and forced.stdout == MIXED


def test_a_reused_session_decodes_exactly_after_a_failed_decode(model_blob):
    """Inside reuse_sessions (as the CLI runs several files), a file whose decoding fails
    part way (here a header rewritten to name the model alone as the predictor: other
    probabilities) leaves the shared session sound for the next file."""
    from nacrith.predictors import predictor_settings

    bad = reheader(model_blob, predictor=predictor_settings(None))
    with reuse.reuse_sessions():
        with pytest.raises(CorruptError):
            pipeline.decompress_to(bad, io.BytesIO())
        assert reuse._reused  # the failed file's session, kept for the next
        out = io.BytesIO()
        pipeline.decompress_to(model_blob, out)
    assert out.getvalue() == MIXED and reuse._reused is None


def test_cpu_build_features_are_read_from_llamas_system_info(monkeypatch):
    """Only the CPU backend's features that are on, in llama.cpp's order (a CUDA build lists
    its own first)."""
    from nacrith import engine

    info = b"CUDA : ARCHS = 900 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX512 = 0 | FMA = 1 | SVE_CNT = 32 | REPACK = 1 | "
    monkeypatch.setattr(engine.L, "llama_print_system_info", lambda: info)
    assert engine._compiled_features("CPU") == ["SSE3", "SSSE3", "AVX", "FMA", "SVE_CNT=32", "REPACK"]
    assert engine._compiled_features("CUDA") == ["ARCHS=900", "USE_GRAPHS"]
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert engine.cpu_build() == "x86_64 SSE3 SSSE3 AVX FMA SVE_CNT=32 REPACK"
    # recorded compactly: a mask of the features CPU_FEATURES lists, the others by name
    assert fmt.cpu_build_field(engine.cpu_build()) == "x86_64/40000047+SVE_CNT=32"
    assert fmt.cpu_build_field("x86_64 REPACK FMA AVX SSSE3 SSE3 SVE_CNT=32") == "x86_64/40000047+SVE_CNT=32"  # any order
    assert fmt.cpu_build_names("x86_64/40000047+SVE_CNT=32") == "x86_64 SSE3 SSSE3 AVX FMA REPACK SVE_CNT=32"
    portable = "x86_64 SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 LLAMAFILE OPENMP REPACK"
    assert "cpu:" + fmt.cpu_build_field(portable) == fmt.TABLES["backend"][2] and fmt.cpu_build_names("x86_64/520000f7") == portable
    assert fmt.cpu_build_names("something newer") == "something newer"
    assert compat.cpu_build_mismatch("x86_64 AVX AVX2", "x86_64 AVX").startswith("this file was made by a llama.cpp CPU build with other features (this one lacks AVX2)")
    assert compat.cpu_build_mismatch("x86_64 AVX AVX2 OPENMP", "x86_64 AVX").startswith("this file was made by a llama.cpp CPU build with other features (this one lacks AVX2),")
    assert compat.arithmetic_of("x86_64 AVX OPENMP REPACK") == compat.arithmetic_of("x86_64 REPACK AVX") != compat.arithmetic_of("x86_64 AVX")


def test_other_engine_is_refused(session, model_blob):
    other = reheader(model_blob, engine="llama.cpp (llama-cpp-python 0.0.1)")
    with pytest.raises(BackendMismatchError, match="0.0.1"):
        unpack(session, other)


def test_varint_bounds():
    out = bytearray()
    for value in (0, 1, 127, 128, 300, 2**40):
        out.clear()
        fmt.put_varint(out, value)
        assert fmt.Reader(bytes(out)).varint() == value
    with pytest.raises(CorruptError):
        fmt.Reader(b"\xff" * 11).varint()
    with pytest.raises(TruncatedError):
        fmt.Reader(b"\xff").varint()


def stored_container(parts: list[bytes]) -> bytes:
    """A container of stored blocks only (no model work to decode it)."""
    blocks = [fmt.write_block(fmt.Block(fmt.STORED, len(part), part)) for part in parts]
    trailer = fmt.Trailer(len(parts), sum(map(len, parts)), fmt.checksum(b"".join(parts)))
    return fmt.write_header(fmt.Header()) + b"".join(blocks) + fmt.write_trailer(trailer)


def test_a_file_parses_as_its_bytes_do(model_blob, tmp_path):
    """parse_file leaves payloads on disk; read in, the blocks equal those parsed in memory."""
    path = tmp_path / "x.nc"
    path.write_bytes(model_blob)
    in_memory = fmt.parse(model_blob)
    with open(path, "rb") as handle:
        [on_disk] = fmt.parse_file(handle, "x.nc")
        assert isinstance(on_disk.blocks[0].payload, fmt.FilePayload)
        assert [block.read_in() for block in on_disk.blocks] == [block.read_in() for block in in_memory.blocks]
    assert (on_disk.header, on_disk.trailer, on_disk.size) == (in_memory.header, in_memory.trailer, len(model_blob))


def test_a_file_is_checked_as_its_bytes_are(model_blob, tmp_path):
    path = tmp_path / "x.nc"
    for length in range(0, len(model_blob), 7):
        path.write_bytes(model_blob[:length])
        with open(path, "rb") as handle, pytest.raises(ContainerError):
            fmt.parse_file(handle)
    damaged = bytearray(model_blob)
    damaged[regions(model_blob)["coded payload"][3]] ^= 1
    path.write_bytes(damaged)
    with open(path, "rb") as handle, pytest.raises(CorruptError, match="payload checksum"):
        fmt.parse_file(handle)


class ChangesInput(io.BytesIO):
    """An output that changes the input file once the first block has been written."""

    def __init__(self, change):
        super().__init__()
        self.change = change

    def write(self, data):
        if self.tell() == 0:
            self.change()
        return super().write(data)


@pytest.mark.parametrize("how", ["truncated", "rewritten"])
def test_an_input_file_changed_while_decoding_is_an_error(tmp_path, how):
    """An mmap'd input died of SIGBUS here (leaving the partial output); now a clean error."""
    from nacrith.errors import InputChangedError

    parts = [bytes([i]) * 300_000 for i in range(3)]
    blob = stored_container(parts)
    path = tmp_path / "x.nc"
    path.write_bytes(blob)

    def change():
        if how == "truncated":
            os.truncate(path, len(blob) // 2)
        else:
            with open(path, "r+b") as handle:
                handle.seek(len(blob) - 100_000)
                handle.write(b"\xff")

    with open(path, "rb") as handle:
        members = fmt.parse_file(handle, "x.nc")
        with pytest.raises(InputChangedError, match="x.nc (shrank|changed) while being read"):
            pipeline.decode_members(members, ChangesInput(change))
    path.write_bytes(blob)
    with open(path, "rb") as handle:
        out = io.BytesIO()
        assert pipeline.decode_members(fmt.parse_file(handle), out) == len(out.getvalue()) == 900_000


def test_concatenated_containers_decode_to_the_concatenation(session, model_blob):
    """`nacrith -c a b > ab.nc` writes two containers, as gzip writes two members."""
    stored = stored_container([b"stored, ", b"then model-coded: "])
    both = stored + model_blob + stored
    members = fmt.parse_members(both)
    assert [member.size for member in members] == [len(stored), len(model_blob), len(stored)]
    assert unpack(session, both) == b"stored, then model-coded: " + MIXED + b"stored, then model-coded: "
    with pytest.raises(CorruptError, match="3 concatenated containers"):
        fmt.parse(both)  # the one-container reader says what it found


def test_damage_in_a_later_container_is_caught(session, model_blob):
    stored = stored_container([b"first"])
    for tail in (model_blob[:-1], model_blob[:3], b"x" + model_blob[1:]):
        with pytest.raises(ContainerError):
            unpack(session, stored + tail)
    wrong = bytearray(stored + model_blob)
    wrong[-5] ^= 1  # the second container's trailer
    with pytest.raises(CorruptError, match="trailer"):
        unpack(session, bytes(wrong))


def test_a_later_container_is_checked_before_anything_is_written(session, model_blob):
    """Each container's model is checked before the first is decoded."""
    header, end = fmt.read_header(model_blob)
    other = fmt.write_header(replace(header, model=replace(header.model, sha256=b"\x01" * 32))) + model_blob[end:]
    out = io.BytesIO()
    with pytest.raises(ModelMismatchError):
        pipeline.decode_members(fmt.parse_members(stored_container([b"first"]) + other), out, session=session)
    assert out.getvalue() == b""


def test_a_long_piped_input_is_spooled_to_disk(monkeypatch, tmp_path):
    """A pipe was read whole into memory (345 MB of RSS for a 300 MB file through `cat`);
    past SPOOL_IN_MEMORY it now goes to a temporary file, parsed as a file is."""
    parts = [bytes([i]) * 5000 for i in range(3)]
    blob = stored_container(parts)
    monkeypatch.setattr(pipeline, "SPOOL_IN_MEMORY", len(blob) - 1)
    with pipeline.parsed_stream(io.BufferedReader(io.BytesIO(blob))) as (members, size):
        assert size == len(blob) and isinstance(members[0].blocks[0].payload, fmt.FilePayload)
        out = io.BytesIO()
        pipeline.decode_members(members, out)
        assert out.getvalue() == b"".join(parts)
    monkeypatch.setattr(pipeline, "SPOOL_IN_MEMORY", len(blob))
    with pipeline.parsed_stream(io.BytesIO(blob)) as (members, size):
        assert size == len(blob) and isinstance(members[0].blocks[0].payload, memoryview)


def test_decompress_stream_reads_files_and_pipes(tmp_path):
    parts = [b"first block, ", b"second"]
    blob = stored_container(parts) + stored_container([b"; another container"])
    path = tmp_path / "x.nc"
    path.write_bytes(blob)
    expected = b"first block, second; another container"
    for source in (open(path, "rb"), io.BytesIO(blob)):
        out = io.BytesIO()
        with source:
            assert pipeline.decompress_stream(source, out) == len(expected) and out.getvalue() == expected
    with open(path, "rb") as handle:
        handle.read(1)  # a file not at its start is read as a stream, from where it is
        with pytest.raises(NotNacrithError):
            pipeline.decompress_stream(handle, io.BytesIO())
    with pytest.raises(NotNacrithError, match="empty input"):
        pipeline.decompress_stream(io.BytesIO(b""), io.BytesIO())


class FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(28, "No space left on device")


def test_a_full_temporary_folder_is_a_spool_error(monkeypatch):
    """It was reported against the input: `nacrith: h.bin: No space left on device`."""
    from nacrith.errors import SpoolError

    full = r"cannot write a temporary file in .* \(No space left on device\)"
    monkeypatch.setattr(pipeline, "SPOOL_IN_MEMORY", 10)
    monkeypatch.setattr(pipeline.tempfile, "TemporaryFile", lambda **options: FullDisk())
    with pytest.raises(SpoolError, match=full):  # piped compressed input
        with pipeline.parsed_stream(io.BytesIO(stored_container([b"x" * 100]))):
            pass
    monkeypatch.setattr(pipeline.tempfile, "SpooledTemporaryFile", lambda **options: FullDisk())
    with pytest.raises(SpoolError, match=full):  # compressed blocks waiting for the header
        pipeline.compress_stream(io.BytesIO(os.urandom(3000)), io.BytesIO(), pipeline.Settings())
