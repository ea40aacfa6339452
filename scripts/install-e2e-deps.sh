#!/usr/bin/env bash
# Install what the lazy-pull end-to-end tests (tests/test_lazy_pull.py) and the
# time-to-ready benchmark (bench/bench_time_to_ready.py) need, on Debian
# bookworm, as root:
#   - golang-go (1.19) and golang-github-containerd-stargz-snapshotter-dev
#     (0.12, the snapshotter as a Go library with all its Go dependencies):
#     the tests build a small snapshotter daemon (tests/e2e/snapshotter/main.go)
#     against /usr/share/gocode in GOPATH mode;
#   - docker-registry: a loopback registry (only its binary is used; no
#     service is started or enabled);
#   - fuse3: fusermount3 and the FUSE userspace bits the snapshotter mounts with;
#   - golang-github-vbatts-tar-split-dev: tests/go/retar (tests/test_tar_reencoding.py)
#     re-encodes tars with Go's archive/tar as upstream does (the stargz library
#     depends on it too; named here because the tar tests use it directly);
#   - debootstrap: scripts/trixie-root.sh builds the Debian trixie root whose podman 5
#     and skopeo 1.18 read containers-flavour zstd:chunked (tests/test_podman_partial.py).
# Idempotent: installs only what is missing; apt-get update runs at most once,
# and only when something is missing.
set -euo pipefail

APT_PACKAGES=(golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-vbatts-tar-split-dev
              docker-registry fuse3 debootstrap)

log() { printf 'install-e2e-deps: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get install)"
export DEBIAN_FRONTEND=noninteractive

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if (( ! ${#missing[@]} )); then
    log "Debian packages present: ${APT_PACKAGES[*]}"
    exit 0
fi

# docker-registry's maintainer scripts would start its service: keep every
# service down during the install (policy-rc.d 101 = action forbidden), and
# restore whatever policy-rc.d was there before.
POLICY=/usr/sbin/policy-rc.d
SAVED=""
if [[ -e "$POLICY" ]]; then
    SAVED="$(mktemp)"
    cp -a "$POLICY" "$SAVED"
fi
restore_policy() {
    if [[ -n "$SAVED" ]]; then
        mv -f "$SAVED" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$POLICY"
chmod 0755 "$POLICY"

log "apt-get update"
apt-get -q update >&2 || die "apt-get update failed"
log "apt-get install ${missing[*]}"
apt-get -q install -y --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"

for p in "${APT_PACKAGES[@]}"; do
    is_installed "$p" || die "$p is still not installed"
done
[[ -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/fs ]] \
    || die "the stargz-snapshotter Go library is not in /usr/share/gocode"
[[ -x /usr/bin/docker-registry ]] || die "/usr/bin/docker-registry is missing"
log "done"
