# One-command set-up on a fresh machine: `make demo` / `make test` create .venv themselves.
# The CPU torch wheel is installed first (a plain `torch` requirement would pull a
# multi-GB CUDA build); GPU images install their own torch and `pip install .`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo curriculum test test-fast lint browser bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian's chromium for the UI test (the Prefect UI driven by Playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: venv
	$(VENV)/bin/arr-coc demo --out runs/demo/heatmap.png

# The whole tiny curriculum (shard → stage 0–3 → report → register) on CPU.
curriculum: venv
	$(VENV)/bin/arr-coc curriculum --config configs/tiny.yaml

lint: venv
	$(VENV)/bin/ruff check .

test: venv browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-fast: venv
	$(VENV)/bin/pytest -q -m "not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache
