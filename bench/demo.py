"""`make demo`: compress and restore one file with the nacrith command and the default model.

Prints the original and compressed sizes, bits per byte and both wall times, and fails
unless the restored bytes equal the original.

Usage: python bench/demo.py FILE
"""
from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NACRITH = str(Path(sys.executable).with_name("nacrith"))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main(source: Path) -> int:
    with tempfile.TemporaryDirectory() as folder:
        packed = Path(folder) / (source.name + ".nc")
        restored = Path(folder) / source.name
        print(f"compressing {source} with the default model ...", flush=True)
        compress_time = timed([NACRITH, "compress", "-f", "-o", str(packed), str(source)])
        decompress_time = timed([NACRITH, "decompress", "-f", "-o", str(restored), str(packed)])
        original, compressed = source.stat().st_size, packed.stat().st_size
        same = filecmp.cmp(source, restored, shallow=False)
        print(f"file          {source.name}")
        print(f"original      {original} bytes")
        print(f"compressed    {compressed} bytes ({8 * compressed / original:.4f} bits/byte)")
        print(f"compress      {compress_time:.1f} s ({original / compress_time / 1000:.2f} KB/s)")
        print(f"decompress    {decompress_time:.1f} s ({original / decompress_time / 1000:.2f} KB/s)")
        print(f"restored      {'identical' if same else 'DIFFERENT'}")
        subprocess.run([NACRITH, "info", str(packed)], check=True)
        return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
