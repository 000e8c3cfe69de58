"""Identical calls give identical containers: thread count, fresh processes, block order."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from nacrith import pipeline, reuse
from nacrith.engine import LockstepContext
from nacrith.session import Session

from .conftest import SMALL, pack, unpack


@pytest.fixture(scope="module")
def session(llama_session):
    """This module's tests are of llama.cpp's determinism (threads, attention modes, companions)."""
    return llama_session

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. Ünïcödé, 中文, emoji 🙂.\n"
).encode() * 3


@pytest.mark.slow
def test_one_and_two_threads_agree(session):
    one = Session(engine="llama.cpp", threads=1)
    two = Session(engine="llama.cpp", threads=2)
    try:
        blob1 = pack(one, TEXT, fallback=False, streams=4, **SMALL)
        blob2 = pack(two, TEXT, fallback=False, streams=4, **SMALL)
        assert blob1 == blob2
        assert unpack(two, blob1) == TEXT
        assert unpack(one, blob2) == TEXT
    finally:
        one.close()
        two.close()


# Long enough for a stream to pass 256 tokens of KV cache, where llama.cpp's CPU
# flash-attention kernel would split a lone sequence's keys among threads.
LONG_TEXT = " ".join(f"line {i}: the {i % 7}th of {i % 13} gardens held {i * 37 % 101} roses." for i in range(60)).encode()
# A container-level test of threads past 256 tokens cannot reach the thread-dependent path:
# a block's streams differ by at most one token, so no stream runs alone for long, and a
# one-stream context runs no flash attention in the modes files use ("off", "stable"). The path is reached below at the level of
# logits (stream 0 alone for many steps), where plain flash attention is shown to differ.


def lone_tail_logits(session, n_streams: int, threads: int, attention: str, steps: int = 262, tail: int = 4) -> np.ndarray:
    """Logits of stream 0 when all streams run ``steps`` steps, then stream 0 alone ``tail`` more."""
    tokens = np.asarray(session.tokenizer.encode(LONG_TEXT)[: steps + tail], np.int32)
    context = LockstepContext(session.llama, n_streams, 512, threads, attention)
    rows = []
    try:
        for position, token in enumerate(tokens):
            running = n_streams if position < steps else 1
            logits = context.step(np.full(running, token, np.int32), np.full(running, position, np.int32))
            rows.append(logits[0].copy())
    finally:
        context.close()
    return np.array(rows)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["off", "stable"])
@pytest.mark.parametrize("n_streams", [1, 2])
def test_cpu_attention_modes_are_thread_independent(session, n_streams, attention):
    """The CPU default ("off") and that of earlier files ("stable"): the same logits for 1 and
    2 threads, also when one stream runs alone past 256 tokens."""
    one = lone_tail_logits(session, n_streams, 1, attention)
    assert np.array_equal(one, lone_tail_logits(session, n_streams, 2, attention))


@pytest.mark.slow
@pytest.mark.parametrize("n_streams", [1, 2])
def test_plain_flash_attention_depends_on_threads(session, n_streams):
    """Why "stable" exists: flash attention alone gives 1 and 2 threads different logits.

    If a llama.cpp update makes this fail, its kernel has become thread-independent and
    flash attention may be used plainly.
    """
    one, two = lone_tail_logits(session, n_streams, 1, "on"), lone_tail_logits(session, n_streams, 2, "on")
    assert np.array_equal(one[:250], two[:250])  # short KV: every thread computes whole rows
    assert not np.array_equal(one[258:], two[258:])  # a lone stream past 256 tokens


@pytest.mark.slow
def test_fresh_process_decodes(session, tmp_path):
    blob = pack(session, TEXT, fallback=False, streams=3, **SMALL)
    (tmp_path / "t.nc").write_bytes(blob)
    code = "import sys, nacrith; sys.stdout.buffer.write(nacrith.decompress(open(sys.argv[1], 'rb').read()))"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.nc")], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == TEXT


@pytest.mark.slow
def test_same_input_same_container(session):
    first = pack(session, TEXT, fallback=False, **SMALL)
    pack(session, TEXT[::-1], fallback=False, **SMALL)  # other work in between
    assert pack(session, TEXT, fallback=False, **SMALL) == first


@pytest.mark.slow
def test_worker_processes_make_the_same_container(tmp_path):
    """Blocks coded in two worker processes: byte-identical to one process, and decodable either way."""
    import nacrith

    data = TEXT * 4
    options = dict(fallback=False, block_size=len(TEXT), streams=2, **SMALL)
    one = nacrith.compress(data, workers=1, **options)
    two = nacrith.compress(data, workers=2, **options)
    assert one == two
    assert nacrith.decompress(two, workers=2) == data
    packed = tmp_path / "two.nc"  # from a file, block payloads are read from disk as the workers take them
    packed.write_bytes(two + two)  # two containers, one after another
    out = io.BytesIO()
    with open(packed, "rb") as source:
        assert pipeline.decompress_stream(source, out, workers=2) == 2 * len(data) and out.getvalue() == data + data


@pytest.mark.slow
def test_files_coded_one_after_another_share_one_worker_pool(monkeypatch):
    """Inside reuse_sessions (the CLI's several FILES), files of the same worker plan are
    coded by the same processes, with the containers of fresh ones, each file's progress
    reported to its own callback; a failed file's pool is stopped and not reused."""
    import nacrith
    from nacrith import workers

    options = dict(fallback=False, block_size=len(TEXT), streams=2, **SMALL)
    first, second = TEXT * 2, TEXT[::-1] * 2
    expected = [nacrith.compress(first, workers=2, **options), nacrith.compress(second, workers=2, **options)]
    started = []

    class CountedPool(workers.WorkerPool):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(workers, "WorkerPool", CountedPool)
    progress = {first: [], second: []}
    with reuse.reuse_sessions():
        blobs = []
        for data in (first, second):
            out = io.BytesIO()
            pipeline.compress_stream(io.BytesIO(data), out, pipeline.Settings(**options), progress[data].append, workers=2)
            blobs.append(out.getvalue())
        assert blobs == expected and len(started) == 1
        # every byte reported, and to its own file's callback: none of the first file's late
        # messages on the second's bar
        assert [sum(progress[data]) for data in (first, second)] == [pytest.approx(len(first)), pytest.approx(len(second))]
        (key,) = reuse._reused
        with pytest.raises(RuntimeError, match="fails"):
            with reuse.worker_pool(key[1], None, None) as pool:
                assert pool is reuse._reused[key]
                raise RuntimeError("a file fails while its blocks are in the pool")
        assert not reuse._reused  # that pool is stopped and gone
        assert pipeline.decompress(expected[1], workers=2) == second
    assert len(started) == 2 and reuse._reused is None


@pytest.mark.slow
def test_lanes_make_the_same_container():
    """Blocks coded side by side in the lanes (threads) of one or two processes: the same bytes."""
    import nacrith

    data = TEXT * 3
    options = dict(fallback=False, block_size=len(TEXT), streams=2, **SMALL)
    one = nacrith.compress(data, workers=1, **options)
    assert nacrith.compress(data, workers="1x3", **options) == one
    assert nacrith.compress(data, workers="2x2", **options) == one
    assert nacrith.decompress(one, workers="1x2") == data


@pytest.mark.slow
def test_256_streams_fit_with_a_companion(session):
    """256 streams is llama.cpp's limit: the companion borrows a finished stream's sequence."""
    tokens = np.asarray(session.tokenizer.encode(TEXT)[:3], np.int32)
    lone = []
    for n_streams in (2, 256):
        context = LockstepContext(session.llama, n_streams, 16, 2, "stable")
        try:
            assert context.first_seq + n_streams <= 256
            context.step(np.full(n_streams, tokens[0], np.int32), np.zeros(n_streams, np.int32))
            context.step(np.full(n_streams, tokens[1], np.int32), np.ones(n_streams, np.int32))
            lone.append(context.step(tokens[2:3], np.full(1, 2, np.int32)).copy())  # stream 0 alone
            assert lone[-1].shape == (1, session.llama.n_vocab)
        finally:
            context.close()
    assert np.array_equal(lone[0], lone[1])  # the same logits whichever sequence keeps it company
