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

# Tools the tests use (Debian): independent DICOM validators (dicom3tools, dcm2niix) and a real PACS with a
# DICOM sender (orthanc, dcmtk) for the listener tests; the tests start and stop their own Orthanc.
TOOL_PACKAGES := dicom3tools dcm2niix orthanc dcmtk
tools:
	@if ! command -v dciodvfy >/dev/null || ! command -v dcm2niix >/dev/null \
	   || ! command -v Orthanc >/dev/null || ! command -v storescu >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TOOL_PACKAGES)) >/dev/null; \
	  else echo "some test tools are missing: tests that need them will be skipped (apt-get install $(TOOL_PACKAGES))"; fi; \
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
