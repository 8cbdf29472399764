# Set-up is idempotent: the venv is created once and re-used while pyproject.toml is unchanged.
VENV ?= .venv
# UTF-8 I/O even where the locale is ASCII (CI, minimal containers).
export PYTHONUTF8 := 1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/layers.py

clean:
	rm -rf $(VENV) runs demo_data
