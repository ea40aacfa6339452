# estargz-opt developer targets. Run as root: the tests and the demo start a
# private containerd and install Debian packages on a fresh machine.
PYTHON ?= python3
# If set, `make test` also writes pytest's exit status to this file (make
# itself reports any failure as 2); .ci/run uses it.
PYTEST_STATUS_FILE ?=

.PHONY: deps test lint demo

deps:
	bash scripts/install-deps.sh

test: deps
	@rc=0; $(PYTHON) -m pytest -q || rc=$$?; \
	if [ -n "$(PYTEST_STATUS_FILE)" ]; then echo $$rc > "$(PYTEST_STATUS_FILE)"; fi; \
	exit $$rc

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy --strict src

demo: deps
	bash scripts/demo.sh
