# storyscan: `make demo` sets up and runs the main job, `make test` sets up and runs the suite.
# Both create .venv when missing and install only what changed (setup.py is the stamp).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STORYSCAN := $(BIN)/storyscan
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO := demo

.PHONY: demo test lint clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The trainer extra brings torch 2.13.0 (CPU build); the device itself needs none of it.
$(VENV)/.installed: setup.py | $(BIN)/python
	$(PIP) -e '.[train,test,fleet]' 2>&1 | grep -v -e '^WARNING: Location' -e '^$$' || true
	$(BIN)/python -c "import torch, onnxruntime, cv2, sqlite_utils" 
	touch $@

demo: $(VENV)/.installed
	$(STORYSCAN) demo-data $(DEMO)/data
	$(STORYSCAN) train --data $(DEMO)/data --out $(DEMO)/run --arch efficientnet_lite0 \
		--size 128 --epochs 5 --batch-size 32 --lr 0.02
	$(STORYSCAN) export $(DEMO)/run/best.pt --data $(DEMO)/data --out $(DEMO)/bundle \
		--name demo --version 1
	$(STORYSCAN) catalog import $(DEMO)/data/catalog --catalog $(DEMO)/catalog.db \
		--bundle $(DEMO)/bundle
	$(STORYSCAN) scan $(DEMO)/data/scans --bundle $(DEMO)/bundle --catalog $(DEMO)/catalog.db \
		--labels-from-folders --summary
	printf '1234\n' | $(STORYSCAN) kiosk-pin --catalog $(DEMO)/catalog.db --pin-stdin
	@echo "demo staff PIN: 1234"
	$(STORYSCAN) kiosk --camera $(DEMO)/data/scan_video.avi --bundle $(DEMO)/bundle \
		--catalog $(DEMO)/catalog.db --ui 127.0.0.1:8080

# tests/test_browser.py drives Debian's chromium headless through Playwright (the test extra;
# Playwright's own browser downloads are never used). Installed here when missing: apt-get as
# root, through sudo otherwise; without apt-get the browser tests skip ("chromium not installed").
CHROMIUM := /usr/bin/chromium
APT_BROWSER := apt-get install -y --no-install-recommends chromium chromium-driver

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive $(APT_BROWSER) >/dev/null || \
	    { $$sudo apt-get update -qq && \
	      $$sudo env DEBIAN_FRONTEND=noninteractive $(APT_BROWSER) >/dev/null; } || \
	    echo "note: chromium could not be installed: the browser tests will be skipped"; \
	  else \
	    echo "note: no apt-get here: install chromium, or the browser tests will be skipped"; \
	  fi; \
	fi

test: $(VENV)/.installed chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO) runs .pytest_cache .ruff_cache
