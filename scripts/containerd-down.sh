#!/usr/bin/env bash
# Stop a containerd started by scripts/containerd-up.sh DIR: SIGTERM, wait,
# SIGKILL as a fallback; also end shims started for that daemon, unmount
# anything still mounted under DIR, then remove DIR. Safe to run twice.
set -euo pipefail

log() { printf 'containerd-down: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: $0 DIR"
if [[ ! -d "$1" ]]; then
    log "$1: no such directory, nothing to do"
    exit 0
fi
DIR="$(cd "$1" && pwd -P)"
[[ "$DIR" != "/" ]] || die "refusing to work on /"
[[ -e "$DIR/.estargz-opt-containerd" ]] \
    || die "$DIR was not made by containerd-up.sh (no .estargz-opt-containerd marker)"
SOCK="$DIR/containerd.sock"
CONF="$DIR/containerd.toml"

# wait_gone PID SECONDS: true once PID has exited.
wait_gone() {
    local pid=$1 n=$(( $2 * 10 ))
    while (( n-- > 0 )); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# Is PID still the containerd started with our config (not a recycled pid)?
is_ours() {
    local cmd
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline")" || return 1
    [[ "$cmd" == *containerd* && "$cmd" == *"$CONF"* ]]
}

stop_pid() {
    local pid=$1 what=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_gone "$pid" 10; then
        log "$what (pid $pid) ignored SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || log "WARNING: $what (pid $pid) still alive"
    fi
}

if [[ -s "$DIR/containerd.pid" ]]; then
    PID="$(cat "$DIR/containerd.pid")"
    if is_ours "$PID"; then
        stop_pid "$PID" containerd
        log "stopped containerd pid $PID"
    fi
fi

# Shims (if any container was ever run) carry our socket in their command line.
for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
    if [[ "$cmd" == *containerd-shim* && "$cmd" == *"$SOCK"* ]]; then
        stop_pid "$pid" shim
    fi
done

# Unmount everything under DIR, deepest first. mountinfo escapes spaces etc.
# as octal (\040); printf %b decodes them.
mapfile -t MOUNTS < <(
    awk -v d="$DIR" '{ if ($5 == d || index($5, d "/") == 1) print $5 }' /proc/self/mountinfo \
        | while IFS= read -r m; do printf '%b\n' "$m"; done | sort -r -u
)
for m in "${MOUNTS[@]}"; do
    [[ -n "$m" ]] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: could not unmount $m"
done

rm -rf --one-file-system "$DIR"
log "removed $DIR"
