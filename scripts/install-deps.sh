#!/usr/bin/env bash
# Set up a fresh Debian bookworm machine (as root) for estargz-opt's tests and
# demo. Idempotent: installs only what is missing, so running it again is
# cheap and needs no network when nothing is missing.
#   - Debian packages: containerd runc skopeo umoci busybox-static debootstrap tmux
#     containernetworking-plugins iproute2 (--cni tests)
#   - a cached busybox-static .deb in /var/cache/estargz-opt/debs (test layer)
#   - the project itself: pip install -e '.[test]' (redone when pyproject.toml
#     changes or the editable install points at another checkout)
#   - the reference ctr-remote 0.14.3 (scripts/install-ctr-remote.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PYTHON="${PYTHON:-python3}"
CACHE="${ESTARGZ_OPT_CACHE:-/var/cache/estargz-opt}"
APT_PACKAGES=(containerd runc skopeo umoci busybox-static debootstrap tmux containernetworking-plugins iproute2)

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get install, /opt, /var/cache)"
export DEBIAN_FRONTEND=noninteractive

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

APT_UPDATED=0
apt_update_once() {
    if (( ! APT_UPDATED )); then
        log "apt-get update"
        apt-get -q update >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# --- Debian packages ----------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [[ "$p" == busybox-static ]] && is_installed busybox; then
        # busybox conflicts with busybox-static; either gives /bin/busybox and
        # the tests only need busybox-static's .deb file, fetched below.
        continue
    fi
    is_installed "$p" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    apt_update_once
    log "apt-get install ${missing[*]}"
    apt-get -q install -y --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
else
    log "Debian packages present: ${APT_PACKAGES[*]}"
fi

# --- busybox-static .deb for the test/demo layer --------------------------------
mkdir -p "$CACHE/debs"
if ! compgen -G "$CACHE/debs/busybox-static_*.deb" >/dev/null; then
    log "downloading busybox-static .deb into $CACHE/debs"
    if ! (cd "$CACHE/debs" && apt-get -q download busybox-static) >&2 2>/dev/null; then
        apt_update_once
        (cd "$CACHE/debs" && apt-get -q download busybox-static) >&2 \
            || die "apt-get download busybox-static failed"
    fi
fi

# --- the project ------------------------------------------------------------------
STAMP="$ROOT/.cache/install-deps.pip-stamp"
want_stamp="$(cd "$ROOT" && { echo "$ROOT"; "$PYTHON" --version; sha256sum pyproject.toml; } 2>&1)"
editable_loc="$("$PYTHON" -m pip show estargz-opt 2>/dev/null \
                | awk -F': ' '/^Editable project location:/ { print $2 }' || true)"
if [[ "$editable_loc" == "$ROOT" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
   && "$PYTHON" -c 'import estargz_opt, pytest, hypothesis' 2>/dev/null; then
    log "project already installed (editable, $ROOT)"
else
    log "pip install -e '.[test]' in $ROOT"
    (cd "$ROOT" && "$PYTHON" -m pip install -q --disable-pip-version-check \
        --root-user-action=ignore -e '.[test]') >&2 \
        || die "pip install -e '.[test]' failed"
    mkdir -p "$ROOT/.cache"
    printf '%s' "$want_stamp" >"$STAMP"
fi

# --- reference ctr-remote -------------------------------------------------------------
"$ROOT/scripts/install-ctr-remote.sh" >/dev/null \
    || die "scripts/install-ctr-remote.sh failed"
"$ROOT/scripts/install-e2e-deps.sh" || die "scripts/install-e2e-deps.sh failed"
log "done"
