#!/usr/bin/env bash
# Set up a fresh Debian bookworm machine (as root) for estargz-opt's demo or
# tests: `install-deps.sh demo` installs only what `make demo` needs, `install-deps.sh test`
# what the test suite needs. Idempotent: installs only what is missing, so
# running it again is cheap and needs no network when nothing is missing.
#   demo: Debian's containerd and runc; a cached busybox-static .deb in
#         /var/cache/estargz-opt/debs (the sample layer); the reference
#         ctr-remote 0.14.3 (scripts/install-ctr-remote.sh), whose get-toc-digest
#         verdict the demo shows.
#   test: the same, plus Debian's crun (--runtime crun tests) skopeo umoci
#         busybox-static debootstrap tmux, uidmap (newuidmap/newgidmap: the
#         rootless runner's several-ids test),
#         containernetworking-plugins iproute2 (--cni tests), qemu-user-static
#         with its qemu-aarch64 binfmt_misc entry registered, and busybox-static
#         for amd64 and arm64 in $CACHE/multiarch (the two-platform image), the lazy-pull
#         end-to-end deps (scripts/install-e2e-deps.sh: Go, the stargz Go
#         library, docker-registry, fuse3).
# The project itself goes into the checkout's venv: scripts/install-venv.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
CACHE="${ESTARGZ_OPT_CACHE:-/var/cache/estargz-opt}"
DEMO_PACKAGES=(containerd runc)
TEST_PACKAGES=("${DEMO_PACKAGES[@]}" crun skopeo umoci busybox-static debootstrap tmux zstd
               containernetworking-plugins iproute2 uidmap qemu-user-static)

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "${1:-}" in
    demo) APT_PACKAGES=("${DEMO_PACKAGES[@]}") ;;
    test) APT_PACKAGES=("${TEST_PACKAGES[@]}") ;;
    *) die "usage: $0 demo|test" ;;
esac
PURPOSE="$1"
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

# --- foreign platforms: qemu-user's binfmt_misc entry, both busybox-static .debs -------
if [[ "$PURPOSE" == test ]]; then
    binfmt=/proc/sys/fs/binfmt_misc
    [[ -e $binfmt/register ]] || mount -t binfmt_misc binfmt_misc "$binfmt" \
        || die "cannot mount binfmt_misc at $binfmt"
    # What systemd-binfmt would do at boot with Debian's entry (it has the F flag).
    [[ -e $binfmt/qemu-aarch64 ]] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register" \
        || die "cannot register qemu-aarch64 with binfmt_misc"
    mkdir -p "$CACHE/multiarch"
    for arch in amd64 arm64; do
        compgen -G "$CACHE/multiarch/busybox-static_*_$arch.deb" >/dev/null && continue
        if [[ $arch != amd64 ]] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
            dpkg --add-architecture "$arch"
            APT_UPDATED=0
        fi
        apt_update_once
        log "downloading busybox-static:$arch into $CACHE/multiarch"
        (cd "$CACHE/multiarch" && apt-get -q download "busybox-static:$arch") >&2 \
            || die "apt-get download busybox-static:$arch failed"
    done
fi

# --- reference ctr-remote -------------------------------------------------------------
"$ROOT/scripts/install-ctr-remote.sh" >/dev/null \
    || die "scripts/install-ctr-remote.sh failed"
if [[ "$PURPOSE" == test ]]; then
    "$ROOT/scripts/install-e2e-deps.sh" || die "scripts/install-e2e-deps.sh failed"
fi
log "done ($PURPOSE)"
