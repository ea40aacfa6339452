# estargz-opt developer targets. Run as root: the tests and the demo start a
# private containerd and install Debian packages on a fresh machine.
PYTHON ?= python3

.PHONY: deps test lint demo

deps:
	bash scripts/install-deps.sh

test: deps
	$(PYTHON) -m pytest -q

lint:
	ruff check .

demo: deps
	bash scripts/demo.sh
