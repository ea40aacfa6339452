#!/usr/bin/env bash
# A Debian trixie root with podman 5, skopeo 1.18, cosign, oras and python3, built once with debootstrap
# under $TRIXIE_ROOT (default /var/tmp/trixie-root), entered with pivot_root (podman unpacks layers
# there) with the cgroup v2 hierarchy of a hybrid host hidden (crun refuses controllers on it).
# Usage: trixie-root.sh            -> builds it, prints its path
#        trixie-root.sh run 'CMD'  -> runs CMD inside (host network; $TRIXIE_SHARE, if set,
#                                     is bound at /share)
set -euo pipefail
T=${TRIXIE_ROOT:-/var/tmp/trixie-root}
if [[ ! -f $T/.done ]]; then
  exec 9>"$T.lock"; flock 9  # one build at a time; a waiter finds it done
fi
if [[ ! -f $T/.done ]]; then
  rm -rf $T; uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1 || true)
  uri=${uri:-http://deb.debian.org/debian}
  debootstrap --variant=minbase --include=podman,skopeo,crun,conmon,netavark,fuse-overlayfs,ca-certificates,cosign,oras,python3,curl \
    trixie $T "$uri" > $T.debootstrap.log 2>&1
  mkdir -p $T/etc/containers
  cat > $T/etc/containers/storage.conf <<'CONF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
[storage.options]
pull_options = {enable_partial_images = "true", use_hard_links = "false", ostree_repos = "", convert_images = "false"}
CONF
  touch $T/.done
fi
if [[ ${1:-} == run ]]; then
  cp /etc/resolv.conf $T/etc/resolv.conf
  mkdir -p $T/.oldroot
  unshare --mount --pid --fork --propagation private bash -c '
    T=$1; mount --bind $T $T
    mount --rbind /dev $T/dev; mount --rbind /sys $T/sys
    if [[ -n $3 ]]; then mkdir -p $T/share; mount --bind "$3" $T/share; fi
    cd $T; pivot_root . .oldroot
    mount -t proc proc /proc; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
    # crun refuses a hybrid host whose v2 hierarchy holds controllers: hide v2 in this namespace
    umount -l /sys/fs/cgroup/unified 2>/dev/null || true
    umount -l /.oldroot
    # the host'"'"'s TMPDIR names a directory this root does not have: its /tmp is new
    export TMPDIR=/tmp
    exec /bin/bash -lc "$2"' x "$T" "$2" "${TRIXIE_SHARE:-}"
else
  echo $T
fi
