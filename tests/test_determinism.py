"""Identical calls give identical containers: thread count, fresh processes, block order."""
from __future__ import annotations

import subprocess
import sys

from nacrith.session import Session

from .conftest import SMALL, pack, unpack

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. Ünïcödé, 中文, emoji 🙂.\n"
).encode() * 3


def test_one_and_two_threads_agree(session):
    one = Session(threads=1)
    two = Session(threads=2)
    try:
        blob1 = pack(one, TEXT, fallback=False, streams=4, **SMALL)
        blob2 = pack(two, TEXT, fallback=False, streams=4, **SMALL)
        assert blob1 == blob2
        assert unpack(two, blob1) == TEXT
        assert unpack(one, blob2) == TEXT
    finally:
        one.close()
        two.close()


def test_fresh_process_decodes(session, tmp_path):
    blob = pack(session, TEXT, fallback=False, streams=3, **SMALL)
    (tmp_path / "t.nc").write_bytes(blob)
    code = "import sys, nacrith; sys.stdout.buffer.write(nacrith.decompress(open(sys.argv[1], 'rb').read()))"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.nc")], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == TEXT


def test_same_input_same_container(session):
    first = pack(session, TEXT, fallback=False, **SMALL)
    pack(session, TEXT[::-1], fallback=False, **SMALL)  # other work in between
    assert pack(session, TEXT, fallback=False, **SMALL) == first


def test_worker_processes_make_the_same_container(tmp_path):
    """Blocks coded in two worker processes: byte-identical to one process, and decodable either way."""
    import nacrith

    data = TEXT * 4
    options = dict(fallback=False, block_size=len(TEXT), streams=2, **SMALL)
    one = nacrith.compress(data, workers=1, **options)
    two = nacrith.compress(data, workers=2, **options)
    assert one == two
    assert nacrith.decompress(two, workers=2) == data
