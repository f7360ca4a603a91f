# dmlbench — the two commands of the README, plus helpers.
#   make sweep   set up .venv and run a real small sweep of 4 methods (nivmf, ccp, diva, proxyanchor)
#                on the embedded datasets (synthetic, digits) with the smoke preset
#   make test    set up .venv and run the test suite (fast and slow tests)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin torch/torchvision to a known pair; set CONSTRAINTS= to let pip choose.
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.dmlbench-installed
SWEEP_OUT ?= results

.PHONY: venv test test-fast sweep bench lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	$(BIN)/python -m pip install -q $(PIP_C) -e ".[dev]"
	@# A CPU-only torch wheel (e.g. a local "+cpu" build picked up through pip's find-links) cannot
	@# load torchvision's compiled ops, which timm needs; replace it with the registry's build of the
	@# same version (runs on CPU too).
	@$(BIN)/python -c "import torchvision, timm" 2>/dev/null || { \
	  echo "torchvision cannot load with this torch build; installing torch $$($(BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])') from the package index"; \
	  $(BIN)/python -m pip install -q --isolated --force-reinstall \
	    "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])')" ; }
	$(BIN)/python -c "import torch, torchvision, timm, ray, optuna, faiss, ray.job_submission, ray.dashboard.modules.job.sdk, aiohttp; print('dmlbench venv ready: torch', torch.__version__)"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

sweep: $(STAMP)
	$(BIN)/dmlbench sweep --methods nivmf,ccp,diva,proxyanchor --datasets embedded --preset smoke --output $(SWEEP_OUT)

bench: $(STAMP)
	$(BIN)/python bench/eval_vs_pml.py

lint: $(STAMP)
	$(BIN)/python -m ruff check dmlbench tests bench

clean:
	rm -rf $(VENV) .pytest_cache
