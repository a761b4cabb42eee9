# One entry point for set-up, the demo and the tests. Every target installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_DIR ?= work_dirs/demo

.PHONY: env demo test clean-env

# Create/complete the virtual environment (idempotent; mmcv is built once per machine and cached).
env: $(VENV)/.installed

$(VENV)/.installed: scripts/install_env.sh scripts/build_mmcv.py setup.py $(wildcard requirements/*.txt)
	VENV=$(VENV) bash scripts/install_env.sh
	touch $@

# The main job on embedded demo data: generate SegPath-layout tiles, train, test, print metrics.
demo: env
	bash scripts/run_demo.sh $(DEMO_DIR)

# The whole test suite. pytest exits 5 when it collects nothing: report that as a failure.
test: env
	@$(PY) -m pytest tests -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests under tests/: treating as failure" >&2; exit 1; fi; \
	exit $$rc

clean-env:
	rm -rf $(VENV)
