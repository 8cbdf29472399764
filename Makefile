# Set-up is idempotent: the venv is created once and re-used while pyproject.toml is unchanged.
VENV ?= .venv
# UTF-8 I/O even where the locale is ASCII (CI, minimal containers).
export PYTHONUTF8 := 1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-brats bench install clean

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
	$(MAKE) --no-print-directory test-brats

# The official BraTS metrics package (brats-evaluation, AGPL-3.0; it pins numpy < 2.3) goes into
# its own folder, put ahead of the venv only for the test that compares kanseg's lesion-wise
# metrics with it. Without a package index the comparison is skipped, with a message.
BRATS := .brats
test-brats: $(STAMP)
	@if test ! -d $(BRATS); then \
	  rm -rf $(BRATS).tmp; \
	  if $(PY) -m pip install -q --target $(BRATS).tmp \
	    'brats-evaluation==0.0.10' 'panoptica==2.1.7'; then \
	    mv $(BRATS).tmp $(BRATS); \
	  else echo "brats-evaluation could not be installed: the official BraTS metric check is skipped"; fi; \
	fi
	@if test -d $(BRATS); then \
	  PYTHONPATH=$(BRATS) $(PY) -m pytest -q -p no:cacheprovider tests/test_lesionwise_official.py; fi

bench: $(STAMP)
	$(PY) benchmarks/layers.py

clean:
	rm -rf $(VENV) $(BRATS) runs demo_data
