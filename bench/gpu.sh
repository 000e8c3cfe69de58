#!/usr/bin/env bash
# GPU run for the H100 test machine (see README "GPU"): set up what it is given, run the GPU
# tests and the GPU benchmark, copy results to $OUT. Finishes within 10 minutes.
#
# Expects, in the working tree's ignored folder .gpu/ or already copied to /tmp/gpu by
# earlier calls (at most 64 MiB travel per call, so the model comes in parts):
#   llama_cpp-*.tar.xz   llama-cpp-python built with CUDA (../shared/gpu), unpacked to /tmp/gpu/site
#   whl/*.whl            constriction and zstandard wheels for the machine's Python 3.12
#   corpora/             bible.txt and alice29.txt
#   model.part*          the GGUF model in pieces (or $NACRITH_MODEL)
set -u
OUT=${OUT:-/tmp/gpu-out}
G=/tmp/gpu
mkdir -p "$OUT" "$G"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
if [ ! -d "$G/site/llama_cpp" ]; then  # normally done by the first call
  mkdir -p "$G/site"
  tar -xJf .gpu/llama_cpp-*.tar.xz -C "$G/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/site" .gpu/whl/*.whl
fi
export PYTHONPATH=$PWD:$G/site PYTHONUNBUFFERED=1
# nacrith's optional C kernel (same bits as numpy, faster); nacrith runs without it
python3 setup.py -q build_ext --inplace >"$OUT/kernel-build.log" 2>&1 || echo "C kernel not built (see kernel-build.log)"
if [ -z "${NACRITH_MODEL:-}" ]; then
  [ -f "$G/model.gguf" ] || cat "$G"/model.part* > "$G/model.gguf"
  export NACRITH_MODEL=$G/model.gguf
fi
[ -d .gpu/corpora ] && cp -r .gpu/corpora "$G/"
export NACRITH_CORPORA=$G/corpora
mkdir -p corpora/data && for f in "$G"/corpora/*; do ln -sf "$f" corpora/data/; done
sha256sum "$NACRITH_MODEL" | tee "$OUT/setup.log"
python3 -c "import nacrith.devices as d; print(d.gpus())" 2>&1 | tee -a "$OUT/setup.log"
nproc | tee -a "$OUT/setup.log"
python3 -c "from nacrith.predictors.llm import _kernels; print('C kernel:', bool(_kernels))" 2>&1 | tee -a "$OUT/setup.log"

step() { echo "== $*" | tee -a "$OUT/run.log"; "$@" 2>&1 | tee -a "$OUT/run.log"; }
step timeout 150 python3 -m pytest -q -s tests/test_gpu.py
BIBLE=corpora/data/bible.txt
# 8 workers x 256 streams gave the best rate so far (85% of raw, LLM only); the ensemble row
# (too slow before the C kernels) gets a smaller input so that it finishes in time
step timeout 150 python3 bench/throughput.py $BIBLE --bytes 3000000 --gpu --streams 256 --workers 8 --llm-only --tag gpu
step timeout 150 python3 bench/throughput.py $BIBLE --bytes 1000000 --gpu --streams 256 --workers 8 --tag gpu
step timeout 120 python3 bench/cpu_vs_gpu.py $BIBLE --bytes 40000 --streams 256
cp bench/results/*gpu* "$OUT/" 2>/dev/null
echo done | tee -a "$OUT/run.log"
