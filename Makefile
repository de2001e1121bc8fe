# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - install into .venv, then run the main job on embedded defaults
#   make test   - install into .venv, then lint (ruff) and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch wheel is platform-specific; override for your machine, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/l2t-dist demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

.PHONY: install demo test
