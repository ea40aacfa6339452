#!/usr/bin/env bash
# Run the unit layer (pytest -m unit) the way a developer without privileges does, to
# show it needs none: as an unprivileged uid with no capabilities (setpriv), in a network namespace
# with no interface up (unshare -n), with a HOME and TMPDIR of its own and nothing written
# into the checkout. Run as root, after the venv exists (`make unit` once); extra
# arguments go to pytest. The user's Python is the venv's when it can run it, else a
# venv made from the system's python3 that sees the same packages
# (tests/support/unprivileged.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VPY="$ROOT/.venv/bin/python"
[[ $EUID -eq 0 ]] || { echo "unit-unprivileged: run as root (it drops to another uid)" >&2; exit 1; }
[[ -x "$VPY" ]] || { echo "unit-unprivileged: no $VPY (run make unit first)" >&2; exit 1; }

read -r USER_ID GROUP_ID HOME_DIR PY < <(cd "$ROOT/tests" && PYTHONDONTWRITEBYTECODE=1 "$VPY" -c \
    'from support.unprivileged import make_unprivileged as m; u = m(); print(u.uid, u.gid, u.home, u.python)')
trap 'rm -rf --one-file-system "$HOME_DIR"' EXIT

cd "$ROOT"
rc=0
unshare --net setpriv --reuid="$USER_ID" --regid="$GROUP_ID" --clear-groups --inh-caps=-all \
    --bounding-set=-all env -i PATH=/usr/bin:/bin LANG=C.UTF-8 HOME="$HOME_DIR" \
    TMPDIR="$HOME_DIR/tmp" PYTHONDONTWRITEBYTECODE=1 \
    HYPOTHESIS_STORAGE_DIRECTORY="$HOME_DIR/hypothesis" \
    "$PY" -m pytest -q -m unit -p no:cacheprovider --basetemp="$HOME_DIR/tmp/pytest" "$@" \
    || rc=$?
exit "$rc"
