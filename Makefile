# feedstack: one-word entries. Every target creates .venv on first use (pip, bytecode compiled).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/kuairand.yaml
SET    ?=

.PHONY: setup test features fit main serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[train,serve,dev]"
	$(PY) -c "import torch; assert torch.version.cuda is None, 'expected the CPU build of torch'"
	touch $@

test: setup
	$(PY) -m pytest -q

features: setup
	$(PY) -m features build --config $(CONFIG) $(SET)

fit: setup
	$(PY) -m training fit --config $(CONFIG) $(SET)

# The main job: features, training, evaluation, ONNX, FAISS, bundle, MLflow registry, then the MLflow UI
# and the BentoML service on localhost with an example request (MAIN_SMOKE=1 stops after the request).
main: setup
	scripts/main.sh --config $(CONFIG) $(SET)

serve: setup
	$(PY) -m serving --bundle models:/feedstack@production --port 3000

clean:
	rm -rf runs
