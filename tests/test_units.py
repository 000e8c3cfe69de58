"""Tokenizer, segmentation, probability table and stream layout, without the coder."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from nacrith.lockstep import check_window, split_streams
from nacrith.predictors.llm import LIMIT, LogitTable
from nacrith.segment import split_segments


def test_piece_table_has_long_pieces(session):
    tokenizer = session.tokenizer
    assert max(len(piece) for piece in tokenizer.pieces) > 32  # detokenize() would drop these
    assert tokenizer.decode(tokenizer.encode(b" " * 200)) == b" " * 200


@pytest.mark.parametrize("data", [b"plain", b"caf\xe9 cr\xe8me", b"\x00\x01text\x7f", "ß∑😀".encode()])
def test_tokenizer_exact(session, data):
    tokens = session.tokenizer.encode(data)
    assert session.tokenizer.decode(tokens) == data


def test_segments_cover_input_and_alternate(session):
    data = b"text " * 40 + bytes(range(256)) + b"more text " * 30 + b"\xff" + b"end of the text " * 10
    segments = split_segments(data, session.tokenizer.has_byte_token)
    assert sum(length for _, length in segments) == len(data)
    kinds = [kind for kind, _ in segments]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))
    offset = 0
    for is_text, length in segments:  # bytes with no byte token never enter text
        if is_text:
            assert session.tokenizer.has_byte_token[np.frombuffer(data[offset:offset + length], np.uint8)].all()
        offset += length


def test_short_text_in_binary_stays_binary(session):
    data = bytes(range(128, 256)) * 4 + b"short" + bytes(range(128, 256)) * 4
    assert split_segments(data, session.tokenizer.has_byte_token) == [(False, len(data))]


# The segmentation as first written (a regular expression for the texty bytes, a Python loop
# over the runs): split_segments must cut every input exactly as it does.
_TEXT_RUN = re.compile(
    rb"(?:[\t\n\r\x20-\x7e]|[\xc2-\xdf][\x80-\xbf]"
    rb"|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


def _reference_runs(mask):
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    starts, ends = np.concatenate(([0], edges)), np.concatenate((edges, [len(mask)]))
    return [(bool(mask[s]), int(s), int(e)) for s, e in zip(starts, ends)] if len(mask) else []


def _reference_segments(data, has_byte_token, min_text=64, max_gap=8, max_stray_fraction=0.2):
    if not data:
        return []
    spellable = has_byte_token[np.frombuffer(data, np.uint8)]
    texty = np.zeros(len(data), bool)
    for match in _TEXT_RUN.finditer(data):
        texty[match.start():match.end()] = True
    texty &= spellable
    text = np.zeros(len(data), bool)
    region_start, strays, region_end = None, 0, 0

    def accept():
        length = region_end - region_start
        if length >= min_text and strays <= max_stray_fraction * length:
            text[region_start:region_end] = True

    for is_texty, start, end in _reference_runs(texty):
        if is_texty:
            if region_start is None:
                region_start, strays = start, 0
            region_end = end
            continue
        short_gap = end - start <= max_gap
        if short_gap and start == 0:
            region_start, strays, region_end = 0, end, end
            continue
        if short_gap and region_start is not None:
            strays += end - start
            region_end = end if end == len(data) else region_end
            continue
        if region_start is not None:
            accept()
            region_start = None
    if region_start is not None:
        accept()
    text &= spellable
    return [(kind, end - start) for kind, start, end in _reference_runs(text)]


def test_segmentation_matches_the_reference_loop():
    """split_segments (array operations) cuts random mixtures of ASCII, UTF-8 (valid,
    overlong, surrogate, truncated), control and random bytes exactly as the loop above,
    with the defaults and with other limits, and some byte values unspellable."""
    rng = np.random.default_rng(7)
    pieces = [b"hello world ", "h\u00e9llo w\u00f6rld \u2014 ".encode(), "\u65e5\u672c\u8a9e".encode(), b"\x00\x01", b"\xff\xfe",
              b"\xe1\x80", b"\xed\xa0\x80", b"\xf0\x90\x80\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80\x80", b"\t\r\n"]
    for trial in range(400):
        has_byte_token = np.ones(256, bool) if trial % 3 else rng.random(256) < 0.92
        parts = []
        for _ in range(rng.integers(1, 40)):
            kind = rng.random()
            if kind < 0.4:
                parts.append(pieces[rng.integers(len(pieces))] * int(rng.integers(1, 12)))
            elif kind < 0.7:
                parts.append(rng.integers(0, 256, rng.integers(1, 20)).astype(np.uint8).tobytes())
            else:
                parts.append(rng.integers(32, 127, rng.integers(1, 200)).astype(np.uint8).tobytes())
        data = b"".join(parts)
        for limits in ({}, {"min_text": 8, "max_gap": 3}, {"min_text": 1, "max_gap": 0, "max_stray_fraction": 0.0}):
            assert split_segments(data, has_byte_token, **limits) == _reference_segments(data, has_byte_token, **limits), (trial, limits)


def test_logit_table_close_to_softmax():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(4, 1000)) * 4).astype(np.float32)
    approx = LogitTable(1000, 4).probabilities(logits)
    approx = approx / approx.sum(axis=1, keepdims=True)
    exact = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    exact /= exact.sum(axis=1, keepdims=True)
    # unnormalised ratios lie in [1, 2^(1/64) * 1.0615]: after normalising, within 8 %
    assert np.abs(approx / exact - 1).max() < 0.08
    kl_bits = (exact * np.log2(exact / approx)).sum(axis=1).max()
    assert kl_bits < 0.002


def test_logit_table_handles_nan_and_extremes():
    logits = np.array([[0.0, -1e30, 3.0, 5.0], [0.0, np.nan, 1.0, 2.0]], np.float32)
    table = LogitTable(4, 2)
    probabilities = table.probabilities(logits).copy()
    assert np.isfinite(probabilities).all() and (probabilities > 0).all()
    assert probabilities[0, 3] == 1.0  # the row maximum maps to exactly 2^0
    assert table.log2_levels(logits)[0, 1] == LIMIT
    assert len(set(probabilities[1])) == 1  # a NaN row degrades to uniform, still codable


def _special_rows(n_vocab: int) -> np.ndarray:
    """Ordinary rows, then rows with NaN, infinities, huge and tiny values, ties, constants."""
    rng = np.random.default_rng(11)
    rows = (rng.normal(size=(12, n_vocab)) * 6).astype(np.float32)
    rows[1, 5 % n_vocab] = np.nan
    rows[2, -1] = np.nan  # in the tail that is not a multiple of the vector width
    rows[3, 0] = np.inf
    rows[4, :] = -np.inf
    rows[5, 1 % n_vocab] = -np.inf
    rows[6, 2 % n_vocab] = -3e38
    rows[7, :] = 1.5  # all tied at the maximum
    rows[8, :] = np.inf
    rows[9, 3 % n_vocab] = 3e38  # distances overflow the integer range
    rows[10] *= 1e-30
    rows[11, ::2] = -0.0
    return rows


@pytest.mark.skipif(not LogitTable(4, 1).use_kernel, reason="nacrith's C kernel is not built here")
@pytest.mark.parametrize("n_vocab", [1, 7, 8, 1000, 49152])
def test_logit_table_kernel_matches_numpy(n_vocab):
    rows = _special_rows(n_vocab)
    with np.errstate(invalid="ignore"):
        reference = LogitTable(n_vocab, len(rows), use_kernel=False).probabilities(rows).copy()
    fast = LogitTable(n_vocab, len(rows), use_kernel=True).probabilities(rows)
    assert reference.view(np.int64).tolist() == fast.view(np.int64).tolist()  # bit for bit, NaN rows too
    threaded = LogitTable(n_vocab, len(rows), threads=2, use_kernel=True).probabilities(rows)
    assert np.array_equal(reference.view(np.int64), threaded.view(np.int64))


def test_logit_table_kernel_refused_when_missing(monkeypatch):
    from nacrith.predictors import llm

    monkeypatch.setattr(llm, "_kernels", None)
    assert not LogitTable(4, 1).use_kernel  # falls back to numpy by default
    with pytest.raises(RuntimeError):
        LogitTable(4, 1, use_kernel=True)


def test_split_streams():
    assert split_streams(0, 4) == []
    assert split_streams(3, 8) == [1, 1, 1]
    assert split_streams(10, 4) == [3, 3, 2, 2]
    assert sum(split_streams(12345, 16)) == 12345


def test_window_checks():
    with pytest.raises(ValueError):
        check_window(32, 32)
    check_window(32, 30)


def test_cpu_worker_plan(monkeypatch):
    from nacrith import workers

    monkeypatch.setattr(workers, "default_threads", lambda: 4)
    monkeypatch.setattr(workers, "_processes_fitting_in_memory", lambda streams, ctx, model_path=None: 3)
    assert workers.plan_workers("auto", False, 16, 1024) == workers.WorkerPlan(3, 1, (None,) * 3)  # memory caps 4 cores
    assert workers.plan_workers("auto", False, 16, 1024, blocks=2).processes == 2
    assert workers.plan_workers(2, False, 16, 1024) == workers.WorkerPlan(2, 2, (None, None))
    # one block: a second worker would only halve the threads of the first
    assert workers.plan_workers(2, False, 16, 1024, blocks=1) == workers.WorkerPlan(1, 4, (None,))
    assert workers.plan_workers(4, False, 16, 1024, threads=1, blocks=9).threads == 1
    with pytest.raises(ValueError):
        workers.plan_workers(0, False, 16, 1024)


def test_a_kept_pool_gives_its_plan_or_is_stopped_before_auto_plans(monkeypatch):
    """Between files (reuse_sessions), the same request takes the kept pool's plan; `auto`
    asked anything else plans only once kept pools are stopped (they hold the memory it
    counts); a fixed count plans with them kept."""
    from nacrith import reuse, workers

    closed, asked = [], []

    def kept(plan, request):
        pool = object.__new__(workers.WorkerPool)  # no processes: only the bookkeeping is under test
        pool.plan, pool.request, pool.close = plan, request, lambda: closed.append(plan)
        return pool

    monkeypatch.setattr(workers, "plan_workers", lambda **request: asked.append(request) or workers.WorkerPlan(2, 1, (None, None)))
    same = workers.WorkerRequest("auto", False, 16, 1024, None, None, 3, False, None)
    with reuse.reuse_sessions():
        reuse._reused["a pool"] = kept(workers.WorkerPlan(3, 1, (None,) * 3), same)
        assert reuse.planned_workers(same).processes == 3 and not asked and not closed
        assert reuse.planned_workers(replace(same, workers=2)).processes == 2 and not closed and len(asked) == 1
        assert asked[0]["requested"] == 2 and asked[0]["blocks"] == 3  # the request's fields, by name
        assert reuse.planned_workers(replace(same, blocks=4)).processes == 2 and closed and not reuse._reused
    assert len(asked) == 2


def test_worker_plan_with_lanes(monkeypatch):
    from nacrith import workers

    monkeypatch.setattr(workers, "default_threads", lambda: 8)
    assert workers.parse_workers("4x2") == (4, 2) and workers.parse_workers(3) == (3, 1) and workers.parse_workers("auto") == ("auto", 1)
    for bad in ("0x2", "2x0", "x2", "2x", "2y2", "-1"):
        with pytest.raises(ValueError):
            workers.parse_workers(bad)
    # threads are shared among every context of every process
    assert workers.plan_workers("2x2", False, 16, 1024) == workers.WorkerPlan(2, 2, (None, None), 2)
    # lanes and processes never outnumber the blocks: 3 blocks fill 2 lanes of 2 processes
    assert workers.plan_workers("4x2", False, 16, 1024, blocks=3) == workers.WorkerPlan(2, 2, (None, None), 2)
    assert workers.plan_workers("4x4", False, 16, 1024, blocks=1) == workers.WorkerPlan(1, 8, (None,), 1)


def test_model_only_follows_the_recorded_predictor():
    from nacrith.settings import Settings
    from nacrith.predictors import EnsembleConfig, ensemble_config

    # an ensemble with every part off is recorded, and decoded, as the model alone: worker
    # planning must see it so on both sides
    for ensemble, alone in ((None, True), (EnsembleConfig(), False), (EnsembleConfig(ngram=False, match=False, bias=False), True)):
        settings = Settings(ensemble=ensemble)
        assert settings.model_only is alone
        assert (ensemble_config(settings.predictor) is None) is alone


def test_gpu_worker_plan(monkeypatch):
    from nacrith import devices, workers

    gib = 1 << 30
    monkeypatch.setattr(workers, "default_threads", lambda: 16)
    monkeypatch.setattr(workers, "kv_cell_bytes", lambda model_path=None: 23040)  # SmolLM2-135M: a context of 256 x 1024 cells is 5.6 GiB
    monkeypatch.setattr(devices, "gpus", lambda: [devices.Device(0, "CUDA0", "test", 80 * gib, 80 * gib), devices.Device(1, "CUDA1", "test", 80 * gib, 80 * gib)])
    # the ensemble: up to 8 processes per GPU, no more than half the cores, the GPUs taken in turn
    assert workers.plan_workers("auto", True, 256, 1024) == workers.WorkerPlan(8, 2, (0, 1) * 4, 1, "test")
    assert workers.plan_workers("auto", True, 256, 1024, gpu_ids={1}) == workers.WorkerPlan(8, 2, (1,) * 8, 1, "test")
    # the model alone: 2 processes of 4 lanes per GPU, within half the cores
    assert workers.plan_workers("auto", True, 256, 1024, model_only=True) == workers.WorkerPlan(2, 2, (0, 1), 4, "test")
    assert workers.plan_workers("auto", True, 256, 1024, gpu_ids={1}, model_only=True) == workers.WorkerPlan(2, 2, (1, 1), 4, "test")
    monkeypatch.setattr(workers, "default_threads", lambda: 32)
    assert workers.plan_workers("auto", True, 256, 1024, model_only=True) == workers.WorkerPlan(4, 2, (0, 1, 0, 1), 4, "test")
    monkeypatch.setattr(workers, "default_threads", lambda: 16)
    # fewer blocks, fewer lanes and processes
    assert workers.plan_workers("auto", True, 256, 1024, blocks=3, model_only=True) == workers.WorkerPlan(1, 5, (0,), 3, "test")
    assert workers.plan_workers("auto", True, 256, 1024, blocks=6, model_only=True) == workers.WorkerPlan(2, 2, (0, 1), 4, "test")
    # a GPU with room for one 4-lane process only (each context: 5.6 GiB of KV cache and a 1 GiB margin)
    monkeypatch.setattr(devices, "gpus", lambda: [devices.Device(0, "CUDA0", "test", 40 * gib, 80 * gib)])
    assert workers.plan_workers("auto", True, 256, 1024, model_only=True) == workers.WorkerPlan(1, 4, (0,), 4, "test")
    assert workers.plan_workers("auto", True, 256, 1024) == workers.WorkerPlan(6, 2, (0,) * 6, 1, "test")
    # few cores: contexts stay at half of them
    monkeypatch.setattr(workers, "default_threads", lambda: 4)
    assert workers.plan_workers("auto", True, 256, 1024, model_only=True) == workers.WorkerPlan(1, 2, (0,), 2, "test")
    assert workers.plan_workers("2x4", True, 256, 1024, model_only=True) == workers.WorkerPlan(2, 1, (0, 0), 4, "test")

def test_gpu_worker_plan_keeps_to_one_gpu_model(monkeypatch):
    """Logits differ between GPU models: a plan's GPUs are all of one model, the file's when
    decoding (refused where no GPU here has it), else the first GPU's."""
    from nacrith import devices, workers
    from nacrith.errors import BackendMismatchError

    gib = 1 << 30
    monkeypatch.setattr(workers, "default_threads", lambda: 16)
    found = [devices.Device(0, "CUDA0", "GPU A", 80 * gib, 80 * gib), devices.Device(1, "CUDA1", "GPU B", 80 * gib, 80 * gib),
             devices.Device(2, "CUDA2", "GPU A", 80 * gib, 80 * gib)]
    monkeypatch.setattr(devices, "gpus", lambda: found)
    assert workers.plan_workers(4, True, 256, 1024) == workers.WorkerPlan(4, 4, (0, 2, 0, 2), 1, "GPU A")
    assert workers.plan_workers(4, True, 256, 1024, gpu_ids={1, 2}) == workers.WorkerPlan(4, 4, (1, 1, 1, 1), 1, "GPU B")
    assert workers.plan_workers(2, True, 256, 1024, gpu_model="GPU B") == workers.WorkerPlan(2, 8, (1, 1), 1, "GPU B")
    with pytest.raises(BackendMismatchError, match="made on a GPU C GPU.*this machine has GPU A, GPU B"):
        workers.plan_workers(2, True, 256, 1024, gpu_model="GPU C")
    with pytest.raises(BackendMismatchError, match=r"made on a GPU B GPU.*GPUs 0 are GPU A \("):
        workers.plan_workers(2, True, 256, 1024, gpu_ids={0}, gpu_model="GPU B")
    assert workers.plan_workers(2, False, 256, 1024).gpu_model is None


def test_kv_cell_bytes_from_the_gguf_header(tmp_path):
    from nacrith import gguf, workers
    from nacrith.model import resolve_model_path

    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) values x 2 bytes (f16)
    path = resolve_model_path()
    metadata = gguf.read_metadata(path)
    assert (metadata["general.architecture"], metadata["llama.block_count"], metadata["llama.attention.head_count_kv"]) == ("llama", 30, 3)
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert gguf.kv_cell_bytes(path) == 30 * 3 * 128 * 2 == workers.kv_cell_bytes(path)
    assert gguf.vocab_size(path) == 49152 and workers.model_size(path) == (path.stat().st_size, 49152)
    header = path.read_bytes()[:4096]
    huge_string = header[:24] + (1 << 62).to_bytes(8, "little") + header[32:]  # the first key's length
    damaged = {"empty": b"", "text": b"not a model", "truncated": header, "v9": b"GGUF" + (9).to_bytes(4, "little") + header[8:], "huge": huge_string}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        assert gguf.kv_cell_bytes(tmp_path / name) is None
        assert gguf.vocab_size(tmp_path / name) is None
        assert workers.kv_cell_bytes(tmp_path / name) == workers.BYTES_PER_KV_CELL
    assert workers.kv_cell_bytes(tmp_path / "absent.gguf") == workers.BYTES_PER_KV_CELL


def test_kv_cell_bytes_reads_each_model_header_once(tmp_path, monkeypatch):
    """workers.kv_cell_bytes reads a model's header once per process, and again once the file changed."""
    import os

    from nacrith import gguf, workers

    reads = []
    monkeypatch.setattr(gguf, "header_facts", lambda path: reads.append(path) or (1000 + len(reads), 7))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"first")
    assert workers.kv_cell_bytes(path) == workers.kv_cell_bytes(path) == 1001 and len(reads) == 1
    assert workers.model_size(path) == (5, 7) and len(reads) == 1  # the vocabulary comes from the same read
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(1, 1))
    assert workers.kv_cell_bytes(path) == 1002 and len(reads) == 2


def test_remaining_size(tmp_path):
    import io

    from nacrith.pipeline import remaining_size

    buffer = io.BytesIO(b"x" * 10)
    buffer.read(3)
    assert remaining_size(buffer) == 7
    path = tmp_path / "f"
    path.write_bytes(b"y" * 20)
    with open(path, "rb") as handle:
        assert remaining_size(handle) == 20
    assert remaining_size(io.BufferedReader(io.BytesIO(b"z"))) is None  # a stream of unknown length


def _reference_levels(scores: np.ndarray, scale: float) -> np.ndarray:
    """The numpy steps of LogitTable for any scale, as int64 bit patterns."""
    distance = np.subtract(scores.max(axis=1, keepdims=True), scores, dtype=np.float32)
    distance = np.multiply(distance, np.float32(scale), dtype=np.float32)
    with np.errstate(invalid="ignore"):
        steps = distance.astype(np.int32).view(np.uint32)
    steps = np.minimum(steps, np.uint32(LIMIT)).astype(np.int64)
    return np.int64(1023 << 52) - (steps << 46)


@pytest.mark.skipif(not LogitTable(4, 1).use_kernel, reason="nacrith's C kernel is not built here")
@pytest.mark.parametrize("tables", ["both", "a", "b", "none"])
def test_scores_kernel_rounds_like_numpy(tables):
    """Scores within 0.3% of each other and a scale of 2^24 levels per unit make every float32
    rounding of ((logits * T) + a) + b visible in the output (one ulp near 1.0 is 2 levels)."""
    from nacrith.predictors.llm import _kernels

    rng = np.random.default_rng(8)
    n_rows, n_vocab, scale, temperature = 6, 999, float(2 ** 24), float(np.float32(0.9999))
    logits = (1 + rng.random((n_rows, n_vocab)) * 0.001).astype(np.float32)
    table_a = (rng.normal(size=(5, n_vocab)) * 3e-4).astype(np.float32) if tables in ("both", "a") else np.empty((0, n_vocab), np.float32)
    table_b = (rng.normal(size=(3, n_vocab)) * 3e-4).astype(np.float32) if tables in ("both", "b") else np.empty((0, n_vocab), np.float32)
    rows_a, rows_b = rng.integers(0, 5, n_rows), rng.integers(0, 3, n_rows)
    if tables == "none":  # None means no table, as an empty one does
        table_a = table_b = None
    scores = logits * np.float32(temperature)
    if table_a is not None and len(table_a):
        scores = scores + table_a[rows_a]
    if table_b is not None and len(table_b):
        scores = scores + table_b[rows_b]
    out = np.empty((n_rows, n_vocab), np.int64)
    _kernels.scores_exp2_rows(logits, out, np.empty(n_vocab, np.float32), n_vocab, scale, temperature, table_a, rows_a, table_b, rows_b)
    reference = _reference_levels(scores, scale)
    assert len(np.unique(reference)) > n_vocab  # the levels really resolve single roundings
    assert np.array_equal(out, reference)


@pytest.mark.skipif(not LogitTable(4, 1).use_kernel, reason="nacrith's C kernel is not built here")
@pytest.mark.parametrize("n_vocab", [1, 7, 8, 9, 127, 128, 129, 300, 1000, 1030, 4100, 49152, 65537, 262144])
def test_kernel_sums_match_numpy(n_vocab):
    """The kernels' row sums (scores_exp2_rows' totals and dots, scale_add_sum) are numpy's
    pairwise sums bit for bit, at sizes around its block edges and at the real vocabulary."""
    from nacrith.predictors.llm import _kernels

    rng = np.random.default_rng(n_vocab)
    logits = (rng.normal(size=(3, n_vocab)) * 8).astype(np.float32)
    logits[2, :: max(1, n_vocab // 5)] = -1e30  # tiny probabilities among large ones
    rows, totals, dots = np.empty((3, n_vocab), np.int64), np.zeros(3), np.zeros(3)
    _kernels.scores_exp2_rows(logits, rows, np.empty(n_vocab, np.float32), n_vocab, 64 / np.log(2), 1.0, None, (), None, (), totals, dots)
    rows = rows.view(np.float64)
    assert totals.view(np.int64).tolist() == rows.sum(axis=1).view(np.int64).tolist()
    assert dots.view(np.int64).tolist() == (rows * logits).sum(axis=1).view(np.int64).tolist()
    row = rng.random(n_vocab) * 10.0 ** rng.integers(-20, 20, n_vocab)  # wide exponents: order matters
    candidates = rng.choice(n_vocab, min(5, n_vocab), replace=False).astype(np.int64)
    additions = rng.random(len(candidates))
    expected = row * 0.37
    expected[candidates] += additions
    assert _kernels.scale_add_sum(row, 0.37, candidates, additions) == expected.sum()
    assert row.view(np.int64).tolist() == expected.view(np.int64).tolist()


def test_kernel_rejects_bad_buffers():
    from nacrith.predictors.llm import _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError):
        _kernels.exp2_rows(logits, np.empty((2, 9), np.int64), 10, 1.0)
    table = np.zeros((3, 10), np.float32)
    with pytest.raises(IndexError):
        _kernels.scores_exp2_rows(logits, np.empty((2, 10), np.int64), np.empty(10, np.float32), 10, 1.0, 1.0,
                                  table, np.array([0, 3]), np.empty((0, 10), np.float32), np.empty(0, np.int64))
    with pytest.raises(ValueError):  # one total per row
        _kernels.scores_exp2_rows(logits, np.empty((2, 10), np.int64), np.empty(10, np.float32), 10, 1.0, 1.0,
                                  None, (), None, (), np.empty(3))
    with pytest.raises(ValueError):  # a candidate outside the row
        _kernels.scale_add_sum(np.zeros(10), 1.0, np.array([10]), np.zeros(1))
    with pytest.raises(ValueError):  # one addition per candidate
        _kernels.scale_add_sum(np.zeros(10), 1.0, np.array([1, 2]), np.zeros(1))
    table = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError):  # AdaGrad squares shaped unlike their bias table
        _kernels.learn_bias(np.ones((1, 10)), 10, np.array([0]), np.ones(1), np.array([3]), 0.5, table, np.array([1]),
                            None, (), 0.3, 1.0, np.zeros((1, 10), np.float32), None)


def _adagrad_reference(table, squares, row, total, lr, eps, token):
    """One AdaGrad step of a bias table row, as the ensemble's numpy code takes it."""
    step = (row * (1.0 / total)).astype(np.float32)
    step[token] -= np.float32(1.0)
    squares += step * step
    table -= (np.float32(lr) * step) / np.sqrt(np.float32(eps) + squares)


@pytest.mark.parametrize("shared", [False, True])
def test_learn_bias_adagrad_both_tables(shared):
    """learn_bias's AdaGrad steps are the numpy code's bits: table a's step, then table b's,
    stream by stream in order (streams 0 and 2 share rows; with ``shared`` both tables are
    one array)."""
    from nacrith.predictors.llm import _kernels

    if _kernels is None:
        pytest.skip("nacrith's C kernel is not built here")
    rng = np.random.default_rng(5)
    n, streams = 1000, 3
    probabilities = rng.random((streams, n)) ** 4
    totals = probabilities.sum(axis=1)
    symbols = rng.integers(0, n, streams).astype(np.int64)
    table_a, squares_a = rng.standard_normal((4, n)).astype(np.float32), rng.random((4, n)).astype(np.float32)
    table_b, squares_b = (table_a, squares_a) if shared else (rng.standard_normal((2, n)).astype(np.float32), rng.random((2, n)).astype(np.float32))
    rows_a, rows_b = np.array([1, 3, 1]), np.array([1, 0, 1])
    want = [array.copy() for array in (table_a, squares_a, table_b, squares_b)]
    if shared:
        want[2:] = want[:2]
    for s in range(streams):
        _adagrad_reference(want[0][rows_a[s]], want[1][rows_a[s]], probabilities[s], totals[s], 0.5, 1.0, symbols[s])
        _adagrad_reference(want[2][rows_b[s]], want[3][rows_b[s]], probabilities[s], totals[s], 0.3, 1.0, symbols[s])
    _kernels.learn_bias(probabilities, n, np.arange(streams), totals, symbols, 0.5, table_a, rows_a, table_b, rows_b, 0.3, 1.0,
                        squares_a, squares_b)
    for got, expected in zip((table_a, squares_a, table_b, squares_b), want):
        assert np.array_equal(got, expected)


# --- the int24 range coder (nacrith.coder) ---------------------------------------------------

from nacrith import coder as coders  # noqa: E402

needs_kernel = pytest.mark.skipif(coders._kernels is None, reason="nacrith's C kernel is not built here")


def coder_rows(rng, k: int, n: int) -> np.ndarray:
    """Peaked random rows, with the awkward ones: zeros, tiny and huge scales, a single winner."""
    rows = rng.random((k, n)) ** 8
    rows[np.arange(k), rng.integers(0, n, k)] = 1.0
    rows[0] = 0.0
    rows[0, n - 1] = 1.0
    rows[1] *= 1e-250
    rows[2] *= 1e250
    if k > 4:
        rows[3] = 2.0 ** -1000  # what a row of NaN logits becomes in the model's table
        rows[3, 0] = 5e-324  # and the smallest subnormal beside it
        rows[4] *= 2.0 ** -1070  # a row that constriction cannot normalise
    return rows


def test_int24_intervals_partition_the_range():
    rng = np.random.default_rng(3)
    for n in (2, 3, 1000):
        for row in coder_rows(rng, 4, n):
            bounds = [coders.interval(row, s) for s in range(n)]
            assert bounds[0][0] == 0 and bounds[-1][1] == coders.TOTAL
            assert all(left < right for left, right in bounds)
            assert all(bounds[s][1] == bounds[s + 1][0] for s in range(n - 1))


def test_int24_kernel_and_numpy_give_the_same_bytes():
    rng = np.random.default_rng(4)
    kernels = (True, False) if coders._kernels is not None else (False,)
    for n in (2, 7, 65, 1000, 49152):
        rows = coder_rows(rng, 30, n)
        symbols = rng.integers(0, n, 30).astype(np.int32)
        symbols[:5] = (0, n - 1, n // 2, 0, n - 1)
        made = set()
        for kernel in kernels:
            encoder = coders.make_encoder("int24", use_kernel=kernel)
            for start in range(0, 30, 7):  # steps of several rows, as the lockstep coder sends them
                encoder.encode(symbols[start:start + 7], rows[start:start + 7])
            made.add(encoder.finish())
        assert len(made) == 1, n
        blob = made.pop()
        for kernel in kernels:
            decoder = coders.make_decoder(blob, "int24", use_kernel=kernel)
            decoded = np.concatenate([decoder.decode(rows[start:start + 7]) for start in range(0, 30, 7)])
            assert (decoded == symbols).all(), (n, kernel)


def test_int24_compresses_like_constriction():
    """Same probabilities, both coders: sizes within a few words (constriction's quantisation differs slightly)."""
    rng = np.random.default_rng(5)
    rows = coder_rows(rng, 200, 5000)[5:]  # rows constriction can normalise
    symbols = np.array([rng.choice(5000, p=row / row.sum()) for row in rows], np.int32)
    sizes = {}
    for name in coders.CODERS:
        encoder = coders.make_encoder(name)
        encoder.encode(symbols, rows)
        sizes[name] = len(encoder.finish())
    assert abs(sizes["int24"] - sizes["constriction"]) <= 8, sizes


def test_int24_refuses_bad_rows_and_bad_data():
    kernels = (True, False) if coders._kernels is not None else (False,)
    for kernel in kernels:
        for bad in ([1.0, np.nan, 0.5], [1.0, -0.1, 0.5], [1.0, np.inf, 0.5], [0.0, 0.0, 0.0], [1.0]):
            with pytest.raises(ValueError):
                coders.make_encoder("int24", use_kernel=kernel).encode(np.zeros(1, np.int32), np.array([bad]))
        with pytest.raises(ValueError):
            coders.make_encoder("int24", use_kernel=kernel).encode(np.array([3], np.int32), np.ones((1, 3)))
        # words that no encoder wrote: an error or some symbols, never a crash
        decoder = coders.make_decoder(b"\xff" * 16, "int24", use_kernel=kernel)
        try:
            decoder.decode(np.ones((8, 3)))
        except coders.CorruptError:
            pass
    with pytest.raises(coders.CorruptError):
        coders.make_decoder(b"\x00" * 5, "int24")


@needs_kernel
def test_int24_kernel_rejects_bad_buffers():
    state = np.array([0, (1 << 64) - 1, 0, 0], np.uint64)
    rows = np.ones((2, 4))
    with pytest.raises(ValueError):  # no room for the words
        coders._kernels.int24_encode(rows, None, np.zeros(2, np.int32), state, np.empty(1, np.uint32), 4)
    with pytest.raises(ValueError):  # one symbol for two rows
        coders._kernels.int24_encode(rows, None, np.zeros(1, np.int32), state, np.empty(4, np.uint32), 4)
    with pytest.raises(ValueError):  # weights without totals of the right length
        coders._kernels.int24_encode(np.ones((2, 4), np.uint32), np.ones(3, np.uint64), np.zeros(2, np.int32), state, np.empty(4, np.uint32), 4)


@needs_kernel
def test_weight_rows_are_the_coders_own_quantisation():
    """The model-only predictor's shortcut (logits straight to int24 weights) gives the same
    integers as the coder's quantisation of the float64 rows, and so the same bytes."""
    rng = np.random.default_rng(6)
    for n in (2, 7, 1000, 49152):
        logits = (rng.standard_normal((12, n)) * 4).astype(np.float32)
        logits[1, n // 2] = np.nan
        logits[2, 0] = np.inf
        logits[3, :] = -np.inf
        logits[4, 1 % n] = 3e38
        table = LogitTable(n, 12, threads=2)
        rows = np.array(table.probabilities(logits))
        weight_rows = table.weight_rows(logits)
        for r in range(12):
            prefix, _ = coders.quantise(rows[r])
            assert (np.diff(prefix) == weight_rows.weights[r]).all() and prefix[-1] == weight_rows.totals[r], (n, r)
        symbols = rng.integers(0, n, 12).astype(np.int32)
        made = []
        for source in (rows, weight_rows):
            for kernel in (True, False):
                encoder = coders.make_encoder("int24", use_kernel=kernel)
                encoder.encode(symbols, source)
                made.append(encoder.finish())
        assert len(set(made)) == 1, n
        for kernel in (True, False):
            assert (coders.make_decoder(made[0], "int24", use_kernel=kernel).decode(weight_rows) == symbols).all()


def test_ngram_single_followers_are_dicts_in_waiting():
    """A context seen once holds its follower as an int; what contexts() gives is, after every
    update, the counts (and their order, which picks the top candidate and the evicted
    follower) that dicts from the start give."""
    from nacrith.predictors.ngram import NGramTables

    def reference_update(tables, history, token, max_order, max_per_context):
        tail = history[-max_order:]
        for order in range(1, len(tail) + 1):
            followers = tables[order].setdefault(tuple(tail[-order:]), {})
            if token not in followers and len(followers) >= max_per_context:
                del followers[min(followers, key=followers.__getitem__)]
            followers[token] = followers.get(token, 0) + 1

    rng = np.random.default_rng(5)
    for vocab in (3, 12, 200):
        tables, reference, history = NGramTables(4, max_per_context=3), [dict() for _ in range(5)], []
        for token in rng.integers(0, vocab, 3000).tolist():
            found = [{f: 1} if isinstance(f, int) else f for f in tables.contexts(history)]
            expected = [reference[order].get(tuple(history[-order:])) if order <= len(history) else None for order in range(1, 5)]
            assert [None if f is None else list(f.items()) for f in found] == [None if e is None else list(e.items()) for e in expected]
            tables.update(history, token)
            reference_update(reference, history, token, 4, 3)
            history.append(token)
        if vocab > 3:  # (with 3 tokens every context recurs)
            assert any(isinstance(f, int) for table in tables.tables[1:] for f in table.values())


def test_match_model_predicts_as_with_tuple_keys():
    """The match index's packed int keys and values predict what tuple keys and (history,
    position) values did, for streams sharing one index."""
    from nacrith.predictors.match import MatchIndex, MatchState

    class Reference:  # the match model with tuple keys and tuple values
        def __init__(self, seen: dict, history: list, size: int):
            self.seen, self.history, self.size = seen, history, size
            self.source, self.position, self.length = None, -1, 0

        def predicted(self) -> int:
            return -1 if self.source is None or self.position >= len(self.source) else self.source[self.position]

        def update(self, token: int) -> None:
            if self.predicted() == token:
                self.position, self.length = self.position + 1, self.length + 1
            else:
                self.source, self.position, self.length = None, -1, 0
            if len(self.history) < self.size:
                return
            key = tuple(self.history[-self.size:])
            if self.source is None and key in self.seen:
                self.source, self.position = self.seen[key]
            self.seen[key] = (self.history, len(self.history))

    rng = np.random.default_rng(9)
    phrase = rng.integers(0, 50000, 40).tolist()
    index, seen = MatchIndex(4), {}
    streams = [([], []) for _ in range(3)]
    states = [(MatchState(index, mine), Reference(seen, theirs, 4)) for mine, theirs in streams]
    matched = 0
    for step in range(1500):
        for (mine, theirs), (state, reference) in zip(streams, states):
            token = phrase[step % 40] if rng.random() < 0.7 else int(rng.integers(0, 50000))
            mine.append(token)
            theirs.append(token)
            state.update(token)
            reference.update(token)
            assert (state.predicted(), state.length) == (reference.predicted(), reference.length)
            matched += state.length > 0
    assert matched > 500


def test_zoo_model_is_joined_once_from_its_part_packages(tmp_path, monkeypatch):
    """Parts found in installed packages (not imported), joined into the cache, checked."""
    import hashlib
    from dataclasses import replace

    from nacrith import model as model_files
    from nacrith.errors import ModelNotFoundError

    pieces = [b"GGUF" + bytes(range(200)), b"second piece" * 50, b"end"]
    for index, piece in enumerate(pieces):
        folder = tmp_path / "site" / f"nacrith_fake_part{index}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise RuntimeError('imported')\n")
        (folder / f"fake.gguf.part{index:02d}").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"nacrith_fake_part{i}", f"data/fake.gguf.part{i:02d}") for i in range(3))
    fake = model_files.ZooModel("fake-1m", "fake.gguf", hashlib.sha256(b"".join(pieces)).hexdigest(), "fake-gguf", "make install-fake", parts)
    monkeypatch.setitem(model_files.ZOO, "fake-1m", fake)
    monkeypatch.chdir(tmp_path)

    path = model_files.resolve_model_path("fake-1m")
    assert path == tmp_path / "cache" / "models" / "fake.gguf" and path.read_bytes() == b"".join(pieces)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # a plain file's mode, not the temporary file's
    made = path.stat().st_mtime_ns
    assert model_files.resolve_model_path("fake-1m") == path and path.stat().st_mtime_ns == made  # joined once
    assert model_files.zoo_model_of(bytes.fromhex(fake.sha256)) is fake

    # parts that do not give the pinned digest: refused, and nothing is left in the cache
    path.unlink()
    monkeypatch.setitem(model_files.ZOO, "fake-1m", replace(fake, sha256="00" * 32))
    with pytest.raises(ModelNotFoundError, match="do not join to its SHA-256.*make install-fake"):
        model_files.resolve_model_path("fake-1m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    # a cache that cannot be written (a file where its folder should be): one line naming it
    monkeypatch.setitem(model_files.ZOO, "fake-1m", fake)
    (tmp_path / "blocked").write_bytes(b"")
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path / "blocked"))
    with pytest.raises(ModelNotFoundError, match="cannot join fake-1m's parts into .*blocked/models .*set NACRITH_CACHE"):
        model_files.resolve_model_path("fake-1m")
    monkeypatch.setenv("NACRITH_CACHE", str(tmp_path / "cache"))

    # a missing part: not installed, with the install hint
    monkeypatch.setitem(model_files.ZOO, "fake-1m", replace(fake, parts=parts + (("nacrith_fake_absent", "x"),)))
    with pytest.raises(ModelNotFoundError, match="model fake-1m is not installed; install it with `make install-fake`"):
        model_files.resolve_model_path("fake-1m")
    # a file of the zoo name in the current folder is taken as that file
    (tmp_path / "fake-1m").write_bytes(b"a file")
    assert model_files.resolve_model_path("fake-1m") == tmp_path.joinpath("fake-1m").relative_to(tmp_path)


def test_cpu_worker_memory_grows_with_the_model(monkeypatch):
    """The default model keeps the measured margin; a bigger file and vocabulary add to it."""
    from nacrith import workers

    monkeypatch.setattr(workers, "kv_cell_bytes", lambda model_path=None: 23040)
    kv = 23040 * 16 * 1024
    monkeypatch.setattr(workers, "model_size", lambda model_path=None: (workers.DEFAULT_MODEL_BYTES, workers.DEFAULT_VOCAB))
    assert workers.cpu_worker_bytes(16, 1024) == kv + workers.CPU_MEMORY_MARGIN
    monkeypatch.setattr(workers, "model_size", lambda model_path=None: (253_113_024, 262_144))  # gemma3-270m
    grown = (253_113_024 - workers.DEFAULT_MODEL_BYTES) + (262_144 - workers.DEFAULT_VOCAB) * (2 * 256 * 4 + 8 * 16)
    assert workers.cpu_worker_bytes(16, 1024) == kv + workers.CPU_MEMORY_MARGIN + grown
    assert 1.2 * (1 << 30) < workers.cpu_worker_bytes(16, 1024) - kv < 1.3 * (1 << 30)  # beside the KV cache: 1.25 GiB for gemma3-270m


def test_each_level_up_has_fewer_streams_or_a_longer_window():
    from nacrith.settings import LEVELS, Settings

    assert sorted(LEVELS) == list(range(1, 10))
    levels = [LEVELS[number] for number in sorted(LEVELS)]
    for lower, higher in zip(levels, levels[1:]):
        assert higher.streams <= lower.streams and higher.ctx >= lower.ctx and higher.min_stream_tokens >= lower.min_stream_tokens
        assert (higher.streams, higher.ctx) != (lower.streams, lower.ctx)
    default = Settings()
    # the default level is the layout every earlier file and figure used
    assert (default.level, default.streams, default.ctx, default.slide, default.min_stream_tokens) == (5, 16, 1024, 256, 1024)


def test_a_level_fills_in_only_what_is_not_given():
    from nacrith import pipeline

    best = pipeline.Settings(level=9)
    assert (best.streams, best.ctx, best.slide, best.min_stream_tokens) == (1, 2048, 512, 2048)
    mixed = pipeline.Settings(level=9, streams=4, ctx=256)
    assert (mixed.streams, mixed.ctx, mixed.slide, mixed.min_stream_tokens) == (4, 256, 64, 2048)
    on_gpu = pipeline.Settings(level=1, gpu=True)  # the window only: a GPU's batch stays wide
    assert (on_gpu.streams, on_gpu.ctx, on_gpu.slide, on_gpu.min_stream_tokens) == (256, 512, 128, 512)
    for bad in (0, 10):
        with pytest.raises(ValueError, match="level must be between 1 and 9"):
            pipeline.Settings(level=bad)


@pytest.mark.parametrize("args, streams", [([], 16), (["--gpus", "all"], 256), (["--gpus", "0", "--streams", "8"], 8), (["--streams", "4"], 4)])
def test_default_streams_follow_the_backend(monkeypatch, tmp_path, args, streams):
    from click.testing import CliRunner

    from nacrith import cli, pipeline

    # one llama_decode of 256 streams costs a GPU little more than one of 16; the CPU pays per token
    seen = []
    monkeypatch.setattr(cli, "compress_one", lambda name, settings, *rest: seen.append(settings))
    (tmp_path / "a.txt").write_bytes(b"text")
    result = CliRunner().invoke(cli.main_group, ["compress", *args, str(tmp_path / "a.txt")])
    assert result.exit_code == 0, result.output
    assert [settings.streams for settings in seen] == [streams]
    gpu = "--gpus" in args
    assert pipeline.Settings(gpu=gpu).streams == (256 if gpu else 16)  # the Python API's default too
    # the fewest tokens per stream: longer streams for small inputs on the CPU, a wide batch on a GPU
    assert [settings.min_stream_tokens for settings in seen] == [512 if gpu else 1024]
    assert pipeline.Settings(gpu=gpu, min_stream_tokens=7).min_stream_tokens == 7


def test_stream_floor_sets_how_many_streams_a_small_input_gets():
    import numpy as np

    from nacrith import pipeline

    tokens = np.arange(40_000)  # about 144 KB of text
    assert len(pipeline.lockstep_streams(tokens, pipeline.Settings())) == 16
    assert len(pipeline.lockstep_streams(tokens[:5_000], pipeline.Settings())) == 4  # 5000 // 1024
    assert len(pipeline.lockstep_streams(tokens[:5_000], pipeline.Settings(gpu=True))) == 9  # 5000 // 512
    assert len(pipeline.lockstep_streams(tokens[:500], pipeline.Settings())) == 1


def test_worker_pool_terminate_prefers_the_public_api():
    from types import SimpleNamespace

    from nacrith.workers import WorkerPool

    calls = []
    process = SimpleNamespace(is_alive=lambda: True, terminate=lambda: calls.append("process"))
    pool = object.__new__(WorkerPool)  # no processes started: only terminate() is under test
    pool.executor = SimpleNamespace(_processes={1: process}, terminate_workers=lambda: calls.append("public"))
    pool.terminate()
    assert calls == ["public"]  # Python 3.14's ProcessPoolExecutor.terminate_workers
    pool.executor = SimpleNamespace(_processes={1: process})
    pool.terminate()
    assert calls == ["public", "process"]  # earlier Pythons: the executor's processes, read defensively
    pool.executor = SimpleNamespace()
    pool.terminate()  # neither: nothing to stop early, and no error
    assert calls == ["public", "process"]


def test_worker_pool_waits_for_the_last_progress_of_a_file():
    """A job's result can reach the parent before the progress its worker sent just before it
    (they travel by different pipes). At the end of a file the pool waits for every job's
    end-of-job message, so that a kept pool's next file does not get this one's progress."""
    import queue

    from nacrith.workers import WorkerPool

    class LateQueue:  # the last message arrives only once the parent waits for it
        def __init__(self, messages):
            self.messages = list(messages)

        def get_nowait(self):
            raise queue.Empty

        def get(self, timeout):
            assert timeout > 0
            if not self.messages:
                raise queue.Empty
            return self.messages.pop(0)

    reported = []
    pool = object.__new__(WorkerPool)  # no processes started: only the progress bookkeeping is under test
    pool.progress, pool.unreported_jobs = reported.append, 2
    pool.progress_queue = LateQueue([(5.0, False), (1.5, True), (0.0, True), (9.0, False)])
    pool._drain()  # while the file runs: only what has arrived
    assert reported == [] and pool.unreported_jobs == 2
    pool._drain(until_all_reported=True)
    assert reported == [5.0, 1.5] and pool.unreported_jobs == 0  # both jobs ended; the next file's message stays queued
    assert pool.progress_queue.messages == [(9.0, False)]
