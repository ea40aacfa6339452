# estargz-opt developer targets. Run as root: the tests and the demo start a
# private containerd and install Debian packages on a fresh machine.
#
# Everything runs from the checkout's virtual environment $(VENV), created on
# first use by $(PYTHON) (any Python >= 3.11; Debian's needs python3-venv, which
# is apt-installed if missing). Nothing is pip-installed into a system Python.
# Each command installs only what it needs, and only once: a second run
# installs nothing and needs no network.
PYTHON ?= python3
VENV := $(CURDIR)/.venv
VPY := $(VENV)/bin/python
# If set, `make test` also writes pytest's exit status to this file (make
# itself reports any failure as 2); .ci/run uses it.
PYTEST_STATUS_FILE ?=

# How the scripts get the venv (they default to the same .venv).
MKVENV = PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/install-venv.sh

.PHONY: demo-deps test-deps test unit unit-unprivileged lint demo

# The demo: containerd, runc, the busybox-static .deb, ctr-remote; the project.
demo-deps:
	bash scripts/install-deps.sh demo
	$(MKVENV) demo >/dev/null

# The suite: the demo's needs, the tools the tests drive, the lazy-pull e2e
# deps (Go, the stargz Go library, docker-registry, fuse3); the project with
# its test extras.
test-deps:
	bash scripts/install-deps.sh test
	$(MKVENV) test >/dev/null

test: test-deps
	@rc=0; "$(VPY)" -m pytest -q || rc=$$?; \
	if [ -n "$(PYTEST_STATUS_FILE)" ]; then echo $$rc > "$(PYTEST_STATUS_FILE)"; fi; \
	exit $$rc

# The fast layer (pytest -m unit): the format engine, TOC/record/prefetch logic, parsing,
# validation and the CLI's messages, in process. No root, no apt, no daemon, no network:
# only the venv. Other layers: -m root, containerd, registry, slow (see tests/conftest.py).
unit:
	$(MKVENV) test >/dev/null
	"$(VPY)" -m pytest -q -m unit -p no:cacheprovider

# `make unit` as it runs for a developer with no privileges: an unprivileged uid with no
# capabilities, in a network namespace of its own (run as root, after `make unit` once).
unit-unprivileged:
	bash scripts/unit-unprivileged.sh

lint:
	$(MKVENV) test >/dev/null
	"$(VPY)" -m ruff check .
	"$(VPY)" -m mypy --strict src
	"$(VPY)" -m mypy --strict docs/examples

demo: demo-deps
	PYTHON="$(VPY)" bash scripts/demo.sh
