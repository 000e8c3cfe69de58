"""corpora/fetch.py's large files: resumable downloads from a local HTTP server, checked,
nothing partial left under the final name."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTENT = bytes(range(256)) * 4000  # the "large" file: 1 MB


def _load_fetch():
    spec = importlib.util.spec_from_file_location("corpora_fetch", ROOT / "corpora" / "fetch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _zipped(content: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("bigfile", content)
    return out.getvalue()


class Server:
    """A loopback HTTP server of one archive that honours ``Range: bytes=N-`` and can cut its
    first ``cut`` responses halfway (the connection closes early)."""

    def __init__(self, payload: bytes, cut: int = 0, ranges: bool = True):
        self.payload, self.cut, self.ranges, self.requests = payload, cut, ranges, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                server.requests.append(asked)
                start = int(asked.split("=")[1].rstrip("-")) if asked and server.ranges else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.end_headers()
                if server.cut > 0:
                    server.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/files"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fetch(tmp_path, monkeypatch):
    module = _load_fetch()
    monkeypatch.setattr(module, "DATA", tmp_path / "data")
    monkeypatch.setattr(module, "LOCAL_ROOTS", [])
    row = dict(name="bigfile", size=len(CONTENT), sha1=hashlib.sha1(CONTENT).hexdigest(), sha256=hashlib.sha256(CONTENT).hexdigest(),
               url="https://example.invalid/dc/bigfile.zip", member="bigfile")
    monkeypatch.setattr(module, "read_large", lambda: [row])
    module.test_row = row
    return module


def test_the_large_manifest_has_the_published_sizes():
    rows = {row["name"]: row for row in _load_fetch().read_large()}
    assert rows["enwik8"]["size"] == 10**8 and rows["enwik9"]["size"] == 10**9
    assert rows["enwik8"]["sha1"] == "57b8363b814821dc9d47aa4d41f58733519076b2"
    assert all(len(row["sha256"]) == 64 for row in rows.values())


def test_a_cut_download_resumes_with_a_range_request(fetch, monkeypatch):
    server = Server(_zipped(CONTENT), cut=1)
    with server as url:
        monkeypatch.setenv("NACRITH_CORPORA_URL", url)
        path = fetch.fetch_large(fetch.test_row)
        assert path.read_bytes() == CONTENT
    assert server.requests[0] is None and server.requests[1].startswith("bytes=") and server.requests[1] != "bytes=0-"
    assert sorted(p.name for p in path.parent.iterdir()) == ["bigfile"]  # no .part left


def test_a_failed_run_keeps_its_part_and_the_next_run_resumes(fetch, monkeypatch):
    archive = _zipped(CONTENT)
    with Server(archive, cut=5) as url:  # every attempt of the first run is cut
        monkeypatch.setenv("NACRITH_CORPORA_URL", url)
        with pytest.raises(SystemExit, match="run again to resume"):
            fetch.fetch_large(fetch.test_row)
    data = fetch.DATA
    assert not (data / "bigfile").exists()
    kept = (data / "bigfile.zip.part").stat().st_size
    assert 0 < kept < len(archive)
    server = Server(archive)
    with server as url:
        monkeypatch.setenv("NACRITH_CORPORA_URL", url)
        path = fetch.fetch_large(fetch.test_row)
        assert path.read_bytes() == CONTENT
    assert server.requests == [f"bytes={kept}-"]  # the second run asked only for what was missing
    assert sorted(p.name for p in data.iterdir()) == ["bigfile"]


def test_a_server_without_ranges_starts_over(fetch, monkeypatch):
    with Server(_zipped(CONTENT), cut=1, ranges=False) as url:
        monkeypatch.setenv("NACRITH_CORPORA_URL", url)
        assert fetch.fetch_large(fetch.test_row).read_bytes() == CONTENT


def test_a_wrong_file_is_refused_and_nothing_is_left(fetch, monkeypatch):
    with Server(_zipped(CONTENT[:-1] + b"x")) as url:
        monkeypatch.setenv("NACRITH_CORPORA_URL", url)
        with pytest.raises(SystemExit, match="want"):
            fetch.fetch_large(fetch.test_row)
    assert list(fetch.DATA.iterdir()) == []
