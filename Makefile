# The README's two commands: `make demo` and `make test`. Both (re)build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install chromium demo test test-fast clean

install: $(STAMP)

# torch first (the CPU wheel on this machine), then the project, then drop the
# `dataclasses` backport img2dataset drags in: it breaks Prefect's temporary server.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip uninstall -y -q dataclasses || true
	touch $(STAMP)

demo: install
	$(BIN)/capfilt demo

# The browser test (tests/data/test_gallery.py) needs Debian's `chromium`: installed here when
# missing and possible (root with apt-get); otherwise that test skips, naming the package.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
	      || echo "could not install chromium; the browser test will be skipped"; \
	  else echo "chromium is not installed (needs root with apt-get); the browser test will be skipped"; fi; }

test: install chromium
	$(BIN)/python -m pytest -q

test-fast: install chromium
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
