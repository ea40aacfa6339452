#!/usr/bin/env bash
# Demo: convert a real layer (Debian's busybox-static) to eStargz with
# estargz-opt, verify it, and let the reference reader (upstream ctr-remote
# 0.14.3) read its TOC from a private containerd's content store.
# Run as root after scripts/install-deps.sh (`make demo` does both).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PYTHON="${PYTHON:-python3}"
CACHE="${ESTARGZ_OPT_CACHE:-/var/cache/estargz-opt}"
CTR_REMOTE="${ESTARGZ_OPT_CTR_REMOTE:-/opt/estargz-opt/ctr-remote/usr/bin/ctr-remote}"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "run as root (a private containerd needs it)"
[[ -x "$CTR_REMOTE" ]] || CTR_REMOTE="$("$ROOT/scripts/install-ctr-remote.sh" | tail -n1)"

if command -v estargz-opt >/dev/null; then
    ESTARGZ_OPT=(estargz-opt)
else
    ESTARGZ_OPT=("$PYTHON" -m estargz_opt)
fi

WORK="$(mktemp -d /tmp/estargz-opt-demo.XXXXXX)"
CTRD="$WORK/containerd"
cleanup() {
    local rc=$?
    if [[ -d "$CTRD" ]]; then "$ROOT/scripts/containerd-down.sh" "$CTRD" || true; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "private containerd in $CTRD"
SOCK="$("$ROOT/scripts/containerd-up.sh" "$CTRD" | tail -n1)"

say "layer tar from Debian's busybox-static"
mkdir -p "$CACHE/debs"
DEB="$(ls "$CACHE"/debs/busybox-static_*.deb 2>/dev/null | tail -n1 || true)"
if [[ -z "$DEB" ]]; then
    (cd "$CACHE/debs" && { apt-get -q download busybox-static \
        || { apt-get -q update && apt-get -q download busybox-static; }; }) >&2 \
        || die "cannot download busybox-static"
    DEB="$(ls "$CACHE"/debs/busybox-static_*.deb | tail -n1)"
fi
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS"
dpkg -x "$DEB" "$ROOTFS"
for applet in sh ls cat echo; do
    ln -s busybox "$ROOTFS/bin/$applet"
    touch -h -r "$ROOTFS/bin/busybox" "$ROOTFS/bin/$applet"
done
# Same mtimes on every run, so the same .deb gives the same layer and digests.
touch -r "$ROOTFS/bin/busybox" "$ROOTFS/bin"
# A docker-style layer: relative names, every parent directory has its own
# entry before its contents (bin/, bin/busybox, bin/sh -> busybox, usr/, ...).
(cd "$ROOTFS" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
    | tar --numeric-owner --owner=0 --group=0 --no-recursion -cf "$WORK/layer.tar" -T -)
echo "layer.tar: $(stat -c %s "$WORK/layer.tar") bytes, $(tar tf "$WORK/layer.tar" | wc -l) entries" >&2

say "estargz-opt layer convert (prioritized: bin/busybox)"
"${ESTARGZ_OPT[@]}" layer convert "$WORK/layer.tar" "$WORK/out.blob" \
    --prioritized-files <(echo bin/busybox) >"$WORK/desc.json"
cat "$WORK/desc.json" >&2
read -r DIGEST SIZE TOC_DIGEST < <("$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["digest"], d["size"], d["tocDigest"])' "$WORK/desc.json")

say "estargz-opt layer verify"
"${ESTARGZ_OPT[@]}" layer verify "$WORK/out.blob" --toc-digest "$TOC_DIGEST"
echo "verify: OK" >&2

say "ingest into containerd and ask the reference reader"
ctr -a "$SOCK" -n default content ingest --expected-digest "$DIGEST" \
    --expected-size "$SIZE" "estargz-opt-demo" <"$WORK/out.blob"
REF_TOC="$("$CTR_REMOTE" -a "$SOCK" -n default images get-toc-digest "$DIGEST")"
echo "ctr-remote get-toc-digest: $REF_TOC" >&2

say "summary"
cat <<SUMMARY
layer tar         : $(stat -c %s "$WORK/layer.tar") bytes
eStargz blob      : $DIGEST ($SIZE bytes)
our tocDigest     : $TOC_DIGEST
ctr-remote reads  : $REF_TOC
SUMMARY
if [[ "$REF_TOC" == "$TOC_DIGEST" ]]; then
    echo "RESULT: the reference reader agrees"
else
    echo "RESULT: MISMATCH between estargz-opt and ctr-remote"
    exit 1
fi
