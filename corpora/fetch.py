"""Put the benchmark corpora into corpora/data/, verified against corpora/manifest.tsv.

Each file is taken from a local copy when one is found (``../shared/corpora`` beside the
checkout, or the folder named by ``NACRITH_CORPORA``), else downloaded from the official
Canterbury Corpus archives. Every file's size and SHA-256 are checked; a mismatch is an
error and leaves no file behind.

The large files (``corpora/large.tsv``: enwik8 and enwik9, 100 MB and 1 GB) are fetched
only when named. Their zip archive is downloaded to ``NAME.zip.part`` and resumed from where
it stopped (an HTTP range request) when the command is run again; the member is unpacked
to ``NAME.part`` while its size, SHA-1 (the published checksum) and SHA-256 are checked,
and only a verified file is renamed to ``NAME``. A mismatch removes both ``.part`` files.
``NACRITH_CORPORA_URL`` replaces the archives' folder URL (a mirror, or a test server).

Usage: python corpora/fetch.py [NAME ...]   (default: every file in the manifest; enwik8 and enwik9 when named)
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
LOCAL_ROOTS = [Path(p) for p in [os.environ.get("NACRITH_CORPORA", ""), HERE.parent.parent / "shared" / "corpora"] if p]


def read_manifest() -> list[dict]:
    """The manifest's rows as dicts with name, size, sha256, url and member."""
    rows = []
    for line in (HERE / "manifest.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, size, sha, url, member = line.split("\t")
        rows.append(dict(name=name, size=int(size), sha256=sha, url=url, member=member))
    return rows


def find_local(name: str) -> Path | None:
    """A local copy of ``name`` under one of the known corpus folders, if any."""
    for root in LOCAL_ROOTS:
        if root.is_dir():
            for candidate in root.rglob(name):
                if candidate.is_file():
                    return candidate
    return None


_archives: dict[str, bytes] = {}


def download_member(url: str, member: str) -> bytes:
    """One member of a .tar.gz archive at ``url`` (each archive downloaded once)."""
    if url not in _archives:
        print(f"downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=60) as response:
            _archives[url] = response.read()
    with tarfile.open(fileobj=io.BytesIO(_archives[url]), mode="r:gz") as archive:
        for info in archive.getmembers():
            if info.isfile() and info.name.lstrip("./") == member:
                return archive.extractfile(info).read()
    raise SystemExit(f"error: {member} is not in {url}")


def fetch(row: dict) -> Path:
    """Make ``corpora/data/<name>`` hold the verified file and return its path."""
    target = DATA / row["name"]
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == row["sha256"]:
        return target
    local = find_local(row["name"])
    data = local.read_bytes() if local else download_member(row["url"], row["member"])
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != row["size"] or digest != row["sha256"]:
        raise SystemExit(f"error: {row['name']}: checksum mismatch (got {digest}, want {row['sha256']})")
    DATA.mkdir(exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.unlink(missing_ok=True)
    if local:
        tmp.symlink_to(local.resolve())  # a verified local copy is linked, not duplicated
    else:
        tmp.write_bytes(data)
    tmp.replace(target)
    return target


CHUNK = 1 << 20


def read_large() -> list[dict]:
    """corpora/large.tsv's rows: name, size, sha1, sha256, url, member."""
    rows = []
    for line in (HERE / "large.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, size, sha1, sha256, url, member = line.split("\t")
            rows.append(dict(name=name, size=int(size), sha1=sha1, sha256=sha256, url=url, member=member))
    return rows


def download_resumable(url: str, part: Path, attempts: int = 5) -> None:
    """Download ``url`` into ``part``, continuing what an earlier, interrupted run left there
    (a range request; a server that ignores ranges sends the whole file again)."""
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:
                    have = 0  # no ranges: start over
                total = response.headers.get("Content-Length")
                print(f"downloading {url}" + (f" from byte {have}" if have else "") + (f" ({int(total) + have} bytes)" if total else ""),
                      file=sys.stderr)
                with open(part, "ab" if have else "wb") as out:
                    shutil.copyfileobj(response, out, CHUNK)
                if total is not None and part.stat().st_size < have + int(total):
                    raise http.client.IncompleteRead(b"", have + int(total) - part.stat().st_size)  # the connection closed early
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the range starts at the end: complete already
                return
            raise SystemExit(f"error: {url}: {exc}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if attempt == attempts - 1:
                raise SystemExit(f"error: {url}: {getattr(exc, 'reason', exc)} ({part} is kept: run again to resume)") from None
            print(f"interrupted ({getattr(exc, 'reason', exc)}); resuming", file=sys.stderr)


def fetch_large(row: dict) -> Path:
    """Make ``corpora/data/<name>`` hold the verified large file and return its path."""
    target = DATA / row["name"]
    if target.is_file() and target.stat().st_size == row["size"]:
        return target  # verified when it was made (checking 1 GB again takes seconds per run)
    DATA.mkdir(exist_ok=True)
    local = find_local(row["name"])
    archive = DATA / f"{row['name']}.zip.part"
    unpacked = DATA / f"{row['name']}.part"
    if local is None:
        base = os.environ.get("NACRITH_CORPORA_URL")
        url = f"{base.rstrip('/')}/{row['url'].rsplit('/', 1)[1]}" if base else row["url"]
        download_resumable(url, archive)
    try:
        sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
        with (open(local, "rb") if local else _member(archive, row["member"])) as source, open(unpacked, "wb") as out:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                sha1.update(chunk)
                sha256.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if (size, sha1.hexdigest(), sha256.hexdigest()) != (row["size"], row["sha1"], row["sha256"]):
            raise SystemExit(f"error: {row['name']}: {size} bytes, sha1 {sha1.hexdigest()}, sha256 {sha256.hexdigest()};"
                             f" want {row['size']} bytes, sha1 {row['sha1']}, sha256 {row['sha256']} (removed; run again to download anew)")
    except BaseException:
        unpacked.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise
    unpacked.replace(target)
    archive.unlink(missing_ok=True)
    return target


def _member(archive: Path, member: str):
    try:
        opened = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise SystemExit(f"error: {archive} is not a zip archive (removed; run again to download anew)") from None
    try:
        return opened.open(member)
    except KeyError:
        raise SystemExit(f"error: {member} is not in {archive}") from None


def main(names: list[str]) -> None:
    rows, large = read_manifest(), {row["name"]: row for row in read_large()}
    known = {row["name"] for row in rows} | set(large)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: not in the manifests: {', '.join(unknown)}")
    for row in rows:
        if not names or row["name"] in names:
            print(f"ok  {fetch(row)}")
    for name in names:
        if name in large:
            print(f"ok  {fetch_large(large[name])}")


if __name__ == "__main__":
    main(sys.argv[1:])
