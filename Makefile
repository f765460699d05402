# The two set-up commands of d4m: `make demo` and `make test`. Both create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: demo test test-slow lint tools clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (a bare 'torch' may pull a multi-GB CUDA build).
	$(BIN)/python -m pip install -q 'torch==2.13.0'
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $@

# Independent DICOM validators used by the tests (Debian: dicom3tools, dcm2niix).
tools:
	@if ! command -v dciodvfy >/dev/null || ! command -v dcm2niix >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcm2niix) >/dev/null; \
	  else echo "dciodvfy/dcm2niix missing: tests that need them will be skipped (apt-get install dicom3tools dcm2niix)"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(STAMP) tools lint
	$(BIN)/pytest

test-slow: $(STAMP) tools
	$(BIN)/pytest -m slow

demo: $(STAMP) tools
	$(BIN)/python demo/run_demo.py --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info
