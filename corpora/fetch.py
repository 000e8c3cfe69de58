"""Put the benchmark corpora into corpora/data/, verified against corpora/manifest.tsv.

Each file is taken from a local copy when one is found (``../shared/corpora`` beside the
checkout, or the folder named by ``NACRITH_CORPORA``), else downloaded from the official
Canterbury Corpus archives. Every file's size and SHA-256 are checked; a mismatch is an
error and leaves no file behind.

Usage: python corpora/fetch.py [NAME ...]   (default: every file in the manifest)
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import urllib.request
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


def main(names: list[str]) -> None:
    rows = read_manifest()
    known = {row["name"] for row in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: not in the manifest: {', '.join(unknown)}")
    for row in rows:
        if not names or row["name"] in names:
            print(f"ok  {fetch(row)}")


if __name__ == "__main__":
    main(sys.argv[1:])
