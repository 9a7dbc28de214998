# Two commands do everything on a fresh machine (see README.md):
#   make run    # main job on its embedded default config (CPU, minutes)
#   make test   # the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.py
WORKDIR ?= runs/default

.PHONY: run test install clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m experiments.run --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
