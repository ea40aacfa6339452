#!/usr/bin/env bash
# Create (once) the project's virtual environment .venv in the checkout and
# install the project into it, editable, for one purpose:
#   install-venv.sh demo   pip install -e .          (what the CLI needs)
#   install-venv.sh test   pip install -e '.[test]'  (plus pytest, ruff, mypy...)
# Nothing is ever pip-installed into the system's Python: Debian's and Ubuntu's
# refuse that (PEP 668, externally-managed-environment), and it would mix the
# project's pins with the distribution's packages.
#
# The venv is made by $PYTHON (default python3), which may be Debian's Python
# (Debian's python3-venv is apt-installed when `python3 -m venv` cannot work) or
# any other Python >= 3.11 (pyenv, a distribution's own build).
# Idempotent and offline on a second run: a stamp per purpose records the
# checkout and the sha256 of pyproject.toml; pip runs again only when that
# changes (a 'test' install also serves 'demo'). A .venv made by hand is kept
# and gets the project installed once; one whose Python no longer runs is
# made again. The venv's Python is printed on the last line of stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
VPY="$VENV/bin/python"

log() { printf 'install-venv: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "${1:-}" in
    demo) SPEC="." ;;
    test) SPEC=".[test]" ;;
    *) die "usage: $0 demo|test" ;;
esac
PURPOSE="$1"

stamp_of() { printf '%s/.estargz-opt-%s.stamp' "$VENV" "$1"; }
WANT="$(printf '%s\n%s\n' "$ROOT" "$(cd "$ROOT" && sha256sum pyproject.toml)")"

stamp_ok() {
    local stamp
    stamp="$(stamp_of "$1")"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$WANT" ]]
}

venv_runs() { [[ -x "$VPY" ]] && "$VPY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

if venv_runs && { stamp_ok "$PURPOSE" || { [[ "$PURPOSE" == demo ]] && stamp_ok test; }; }; then
    log "project installed in $VENV ($PURPOSE)"
    echo "$VPY"
    exit 0
fi

# --- the venv ----------------------------------------------------------------------
can_make_venv() { "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }

if ! venv_runs; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (a Python >= 3.11 is needed)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); estargz-opt needs Python >= 3.11"
    if ! can_make_venv; then
        # Debian splits ensurepip out of the standard library into python3-venv.
        [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null \
            || die "$PYTHON cannot create a venv: install Debian's python3-venv (as root: apt-get install python3-venv)"
        export DEBIAN_FRONTEND=noninteractive
        log "apt-get install python3-venv ($PYTHON has no ensurepip)"
        { apt-get -q install -y --no-install-recommends python3-venv \
            || { apt-get -q update && apt-get -q install -y --no-install-recommends python3-venv; }; } >&2 \
            || die "apt-get install python3-venv failed"
        can_make_venv || die "$PYTHON still cannot create a venv after installing python3-venv"
    fi
    log "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv --clear "$VENV" >&2 || die "$PYTHON -m venv $VENV failed"
fi

# --- the project -------------------------------------------------------------------
log "pip install -e '$SPEC' into $VENV"
rm -f "$(stamp_of demo)" "$(stamp_of test)"
(cd "$ROOT" && "$VPY" -m pip install -q --disable-pip-version-check \
    --root-user-action=ignore -e "$SPEC") >&2 \
    || die "pip install -e '$SPEC' into $VENV failed"
"$VPY" -c 'import estargz_opt' || die "estargz_opt does not import from $VENV"
printf '%s' "$WANT" >"$(stamp_of "$PURPOSE")"
echo "$VPY"
