# Two entry points for a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-out

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import open_clip, torchvision, apache_beam, faiss, numba, aiohttp"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/curate demo --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/fetch.py
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/clip.py throughput
	$(BIN)/python benchmarks/clip.py index
	$(BIN)/python benchmarks/vq.py
	$(BIN)/python benchmarks/tokens.py
	$(BIN)/python benchmarks/reader.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(OUT) .pytest_cache
