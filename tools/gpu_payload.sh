#!/usr/bin/env bash
# Build the ignored folder .gpu/ that bench/gpu.sh is given on the GPU test machine, as three
# payloads that each fit one device call (at most 64 MiB travel per call, the working tree
# included): .gpu/c1 holds ../shared/gpu's CUDA build of llama-cpp-python, the wheels the
# machine's Python 3.12 lacks, bible.txt and alice29.txt, and the model's first part; .gpu/c2
# and .gpu/c3 hold the rest of the model. Prints the three calls to make back to back (the
# machine is given back after 30 s idle). Run after `make install corpora`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1024 * 1024))  # the call's own files, results written meanwhile
TREE=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)

rm -rf .gpu
mkdir -p .gpu/c1/whl .gpu/c1/corpora .gpu/c2 .gpu/c3
cp ../shared/gpu/llama_cpp-*.tar.xz .gpu/c1/
# the versions installed here, as wheels for the machine's CPython 3.12 (it has numpy, click, tqdm)
for package in constriction zstandard setuptools; do
  version=$($PY -c "from importlib.metadata import version; print(version('$package'))")
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/c1/whl "$package==$version"
done
cp corpora/data/bible.txt corpora/data/alice29.txt .gpu/c1/corpora/

MODEL=$($PY -c "from nacrith.model import locate; print(locate().path)")
SIZE=$(stat -c %s "$MODEL")
USED=$(du -cb .gpu/c1 | tail -1 | cut -f1)
FIRST=$((LIMIT - MARGIN - TREE - USED))
REST=$(( (SIZE - FIRST + 1) / 2 ))
[ "$FIRST" -gt 0 ] && [ $((REST + TREE + MARGIN)) -lt "$LIMIT" ] || { echo "the payload does not fit three calls" >&2; exit 1; }
part() { dd if="$MODEL" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count=$3} status=none; }
part .gpu/c1/model.part0 0 "$FIRST"
part .gpu/c2/model.part1 "$FIRST" "$REST"
part .gpu/c3/model.part2 $((FIRST + REST))
JOINED=$(cat .gpu/c1/model.part0 .gpu/c2/model.part1 .gpu/c3/model.part2 | sha256sum | cut -d' ' -f1)
[ "$JOINED" = "$(sha256sum "$MODEL" | cut -d' ' -f1)" ] || { echo "the model parts do not join to the model" >&2; exit 1; }
du -sh .gpu/c1 .gpu/c2 .gpu/c3
echo "model parts join to sha256 $JOINED"
cat <<'CALLS'
device calls, back to back:
  1. carry [".gpu/c1"]: set -e; mkdir -p /tmp/gpu/site; cp -r .gpu/c1/corpora .gpu/c1/model.part0 /tmp/gpu/; tar -xJf .gpu/c1/llama_cpp-*.tar.xz -C /tmp/gpu/site; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu/site .gpu/c1/whl/*.whl
  2. carry [".gpu/c2"]: cp .gpu/c2/model.part1 /tmp/gpu/
  3. carry [".gpu/c3"], timeout_s 600: cp .gpu/c3/model.part2 /tmp/gpu/ && bash bench/gpu.sh
CALLS
