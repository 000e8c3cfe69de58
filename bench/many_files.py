"""Many small files in one `nacrith` command: whole-process seconds.

Cuts FILES small slices of a corpus file into a temporary folder, then times, as whole
`nacrith` processes (the median of --repeat runs):
  compress    nacrith -q -k SLICE...          (every slice to SLICE.nc)
  decompress  nacrith -q -d -c SLICE.nc...    (every container, in one command)
  members     nacrith -q -d -c ALL.nc         (the containers concatenated into one file)
and checks that both decodings give the slices back. Each run of a command codes the same
slices, so its seconds are start-up, model loading and coding together: what one command
over a folder of small files (`nacrith -r`) costs. --workers and --block-size are passed on
(--block-size to compression only): with blocks smaller than a slice, each file is coded
by worker processes.

--checkout DIR runs the nacrith of another source tree (its package first on PYTHONPATH,
with this interpreter), e.g. an earlier commit from `git archive`, for a before/after pair.

    python bench/many_files.py corpora/data/alice29.txt --files 10 --bytes 200 --tag cpu
    python bench/many_files.py corpora/data/alice29.txt --files 4 --bytes 400 --block-size 200 --workers 2 --tag cpu-pool
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, run_process, succeeded


def slices(source: Path, files: int, size: int) -> list[bytes]:
    data = source.read_bytes()
    if files * size > len(data):
        raise SystemExit(f"{source} has {len(data)} bytes, fewer than {files} x {size}")
    return [data[index * size : (index + 1) * size] for index in range(files)]


def measure(pieces: list[bytes], checkout: Path, repeat: int, options: list[str] = (), compress_options: list[str] = ()) -> dict:
    original = b"".join(pieces)
    seconds: dict[str, list[float]] = {"compress": [], "decompress": [], "members": []}
    with tempfile.TemporaryDirectory(prefix="nacrith-many-") as name:
        folder = Path(name)

        def timed(args: list[str]) -> tuple[float, bytes]:
            """One `nacrith -q ARGS` in the folder: (seconds, its standard output)."""
            spent, done = run_process(sys.executable, ["-m", "nacrith.cli", "-q", *options, *args], checkout, folder)
            return spent, succeeded(done)

        names = [f"f{index:03d}.txt" for index in range(len(pieces))]
        for file, piece in zip(names, pieces):
            (folder / file).write_bytes(piece)
        packed = [f"{file}.nc" for file in names]
        for _ in range(repeat):
            for file in packed:
                (folder / file).unlink(missing_ok=True)
            seconds["compress"].append(timed([*compress_options, "-k", *names])[0])
            (folder / "all.nc").write_bytes(b"".join((folder / file).read_bytes() for file in packed))
            spent, restored = timed(["-d", "-c", *packed])
            seconds["decompress"].append(spent)
            spent, joined = timed(["-d", "-c", "all.nc"])
            seconds["members"].append(spent)
            if restored != original or joined != original:
                raise SystemExit("a decoding did not give the slices back")
        compressed = sum((folder / file).stat().st_size for file in packed)
    return {"compressed_bytes": compressed, "seconds": seconds, "median_s": {key: statistics.median(value) for key, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--bytes", type=int, default=200, help="bytes per slice")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the source tree whose nacrith runs (default: this one)")
    parser.add_argument("--workers", help="nacrith --workers, for every command")
    parser.add_argument("--block-size", help="nacrith --block-size, for compression")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    options = ["--workers", args.workers] if args.workers else []
    compress_options = ["--block-size", args.block_size] if args.block_size else []
    result = measure(slices(args.source, args.files, args.bytes), args.checkout.resolve(), args.repeat, options, compress_options)
    result.update(source=args.source.name, files=args.files, bytes_per_file=args.bytes, checkout=str(args.checkout), tag=args.tag,
                  workers=args.workers, block_size=args.block_size)
    medians = result["median_s"]
    print(f"{args.files} x {args.bytes} B of {args.source.name} ({args.checkout}): {result['compressed_bytes']} B compressed;"
          f" compress {medians['compress']:.2f} s, decompress {medians['decompress']:.2f} s, concatenated {medians['members']:.2f} s"
          f" (median of {args.repeat})")
    out = RESULTS / f"many-files-{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
