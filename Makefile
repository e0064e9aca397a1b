# Two entry points for a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-out

.PHONY: install browser demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import open_clip, torchvision, apache_beam, faiss, numba, aiohttp, openlineage.client"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/curate demo --out $(OUT)

# Headless Chromium renders the run report in one test: Debian's package, installed when missing
# and apt-get can (root); elsewhere that test says how to get it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no Chromium here (Debian package chromium); the report's browser test will be skipped"

test: install browser
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
