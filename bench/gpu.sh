#!/usr/bin/env bash
# GPU run for the H100 test machine (see README "GPU"): set up what it is given, run the GPU
# tests and the GPU benchmarks, copy results to $OUT. Finishes within 10 minutes: each step
# has its own time limit, and the optional last steps run only while time is left.
#
# Expects, already in /tmp/gpu from earlier calls (at most 64 MiB travel per call, so the
# model comes in parts; see README "GPU"), or in the working tree's ignored folder .gpu/:
#   site/ or llama_cpp-*.tar.xz   llama-cpp-python built with CUDA (../shared/gpu) and the
#                                 constriction and zstandard wheels for the machine's Python
#   corpora/                      bible.txt and alice29.txt
#   model.part*                   the GGUF model in pieces (or $NACRITH_MODEL)
set -u
OUT=${OUT:-/tmp/gpu-out}
G=/tmp/gpu
BEGAN=$(date +%s)
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
{ sha256sum "$NACRITH_MODEL"; nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader; nproc
  python3 -c "import nacrith.devices as d; print(d.gpus())"
  python3 -c "from nacrith.predictors.llm import _kernels; print('C kernel:', bool(_kernels))"; } 2>&1 | tee "$OUT/setup.log"

left() { echo $(( ${1} - ($(date +%s) - BEGAN) )); }
step() { echo "== [$(( $(date +%s) - BEGAN )) s] $*" | tee -a "$OUT/run.log"; "$@" 2>&1 | grep -v -e '^ggml_cuda_init' -e '^  Device 0' | tee -a "$OUT/run.log"; }
step timeout 150 python3 -m pytest -q -s tests/test_gpu.py
BIBLE=corpora/data/bible.txt
# Lanes: contexts per process running side by side (threads). Raw decode only, short, every
# layout at most 8 contexts of 256 streams (8 x 1024-token windows fill ~48 GB).
step timeout 120 python3 bench/lanes.py $BIBLE --gpu --streams 256 --steps 96 --ctx 256 --layouts 1x1,1x1:on,1x1:off,1x2,1x4,2x2,2x4,4x1,4x2,8x1 --tag gpu
# the fastest layout with lanes whose lane 0 gave the same logits as alone (none: 8x1)
BEST=$(python3 - <<'EOF'
import json
try:
    rows = json.load(open("bench/results/lanes-gpu.json"))["rows"]
except (OSError, ValueError, KeyError):
    rows = []
good = [r for r in rows if r.get("lanes", 1) > 1 and r.get("lane0_same_as_alone") and ":" not in r["layout"]]
best = max(good, key=lambda r: r["tok_s"], default=None)
print(best["layout"] if best else "8x1")
EOF
)
echo "best layout with lanes: $BEST" | tee -a "$OUT/run.log"
# 8 workers x 256 streams gave the best end-to-end rate before lanes (85% of raw, LLM only)
step timeout 150 python3 bench/throughput.py $BIBLE --bytes 3000000 --gpu --streams 256 --workers 8 --llm-only --tag gpu
[ "$BEST" != "8x1" ] && [ "$(left 400)" -gt 100 ] && step timeout "$(left 400)" python3 bench/throughput.py $BIBLE --bytes 3000000 --gpu --streams 256 --workers "$BEST" --llm-only --tag gpu
[ "$(left 470)" -gt 60 ] && step timeout "$(left 470)" python3 bench/throughput.py $BIBLE --bytes 1000000 --gpu --streams 256 --workers "$BEST" --tag gpu
[ "$(left 520)" -gt 45 ] && step timeout "$(left 520)" python3 bench/cpu_vs_gpu.py $BIBLE --bytes 40000 --streams 256
cp bench/results/*gpu* "$OUT/" 2>/dev/null
echo "done in $(( $(date +%s) - BEGAN )) s" | tee -a "$OUT/run.log"
