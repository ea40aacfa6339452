#!/usr/bin/env bash
# Install the reference tool ctr-remote (stargz-snapshotter 0.14.3) from
# Debian trixie's package `stargz-snapshotter`, on a bookworm machine, WITHOUT
# adding trixie to the system's apt sources.
#
# A private apt configuration (own sources.list, lists, cache and an empty
# dpkg status file) is kept under $ESTARGZ_OPT_APT_DIR; the package is only
# downloaded (`apt-get download`) and unpacked with `dpkg -x` into
# $ESTARGZ_OPT_CTR_REMOTE_PREFIX, so dpkg's database is never touched.
#
# Idempotent: does nothing if the binary is already there, runs, and was
# unpacked from the wanted package version. (`ctr-remote --version` prints the
# version of the containerd client library it was built with, e.g.
# "ctr github.com/containerd/containerd 1.7.24+unknown", not the
# stargz-snapshotter version, so the package version is kept in a stamp file
# $PREFIX/PACKAGE-VERSION written from the .deb's control data.) The binary's path is printed on the last line of stdout;
# everything else goes to stderr.
set -euo pipefail

WANT_VERSION="${CTR_REMOTE_VERSION:-0.14.3}"
SUITE="${CTR_REMOTE_SUITE:-trixie}"
PREFIX="${ESTARGZ_OPT_CTR_REMOTE_PREFIX:-/opt/estargz-opt/ctr-remote}"
APTDIR="${ESTARGZ_OPT_APT_DIR:-/var/cache/estargz-opt/apt-$SUITE}"
BIN="$PREFIX/usr/bin/ctr-remote"
STAMP="$PREFIX/PACKAGE-VERSION"

log() { printf 'install-ctr-remote: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

version_ok() {
    # True if the binary runs and the stamp names a $WANT_VERSION package
    # (Debian versions look like 0.14.3-4+b6).
    local stamp
    [[ -x "$BIN" ]] || return 1
    "$BIN" --version >/dev/null 2>&1 || return 1
    stamp="$(cat "$STAMP" 2>/dev/null)" || return 1
    [[ "$stamp" == "$WANT_VERSION" || "$stamp" == "$WANT_VERSION"-* ]]
}

if version_ok; then
    log "already installed: stargz-snapshotter $(cat "$STAMP"), $("$BIN" --version)"
    echo "$BIN"
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "must run as root (writes $PREFIX and $APTDIR)"
for tool in apt-get dpkg dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool not found (a Debian system is required)"
done

# --- find the Debian mirror URI in the system's own apt sources -------------
mirror_uri() {
    local f uri
    # deb822 sources first (bookworm default), then one-line sources.
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        # Use a stanza whose Suites has a plain release (not -security) and
        # whose URI ends in /debian.
        uri="$(awk '
            BEGIN { RS=""; FS="\n" }
            {
                u=""; s=""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)   { u=$i; sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); u=a[1] }
                    if ($i ~ /^Suites:/) { s=$i }
                }
                if (u ~ /\/debian\/?$/ && s !~ /security/) { print u; exit }
            }' "$f")"
        if [[ -n "$uri" ]]; then echo "${uri%/}"; return 0; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        uri="$(awk '$1 == "deb" {
                    for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { u=$i; break }
                    if (u ~ /\/debian\/?$/) { print u; exit }
                    u=""
                }' "$f")"
        if [[ -n "$uri" ]]; then echo "${uri%/}"; return 0; fi
    done
    return 1
}

URI="${CTR_REMOTE_MIRROR:-}"
[[ -n "$URI" ]] || URI="$(mirror_uri)" || die "no Debian mirror (URI ending in /debian) found in /etc/apt/sources*"
log "using mirror $URI, suite $SUITE"

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r "$KEYRING" ]] || die "$KEYRING missing (install debian-archive-keyring)"

# --- private apt configuration ------------------------------------------------
mkdir -p "$APTDIR"/{lists/partial,cache/archives/partial,sources.list.d,preferences.d,download}
: >"$APTDIR/status"   # empty dpkg status: we only download, never install
cat >"$APTDIR/sources.list" <<SRC
deb [signed-by=$KEYRING] $URI $SUITE main
SRC
cat >"$APTDIR/apt.conf" <<CONF
// Private apt configuration of estargz-opt's install-ctr-remote.sh.
// Read with -c, i.e. after the system's apt.conf.d, so these win.
Dir::Etc::sourcelist "$APTDIR/sources.list";
Dir::Etc::sourceparts "$APTDIR/sources.list.d";
Dir::Etc::preferences "$APTDIR/preferences";
Dir::Etc::preferencesparts "$APTDIR/preferences.d";
Dir::State::Lists "$APTDIR/lists";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR/cache";
Dir::Cache::archives "$APTDIR/cache/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT::Get::List-Cleanup "true";
CONF

apt_private() { apt-get -q -c "$APTDIR/apt.conf" "$@"; }

log "apt-get update (private lists in $APTDIR/lists)"
apt_private update >&2 || die "apt-get update for $SUITE failed (is the mirror reachable?)"

CAND="$(apt-cache -c "$APTDIR/apt.conf" policy stargz-snapshotter 2>/dev/null \
        | awk '/Candidate:/ { print $2 }')"
[[ -n "$CAND" && "$CAND" != "(none)" ]] || die "stargz-snapshotter not found in $SUITE"
log "stargz-snapshotter candidate in $SUITE: $CAND"
[[ "$CAND" == "$WANT_VERSION"* ]] \
    || log "WARNING: $SUITE has $CAND, wanted $WANT_VERSION; trying it anyway"

rm -f "$APTDIR"/download/*.deb
# apt downloads as the unprivileged _apt user when it can write the target dir.
if getent passwd _apt >/dev/null; then chown _apt "$APTDIR/download"; fi
(cd "$APTDIR/download" && apt_private download "stargz-snapshotter=$CAND") >&2 \
    || die "apt-get download stargz-snapshotter=$CAND failed"
DEB="$(ls "$APTDIR"/download/stargz-snapshotter_*.deb 2>/dev/null | head -n1)"
[[ -n "$DEB" ]] || die "downloaded .deb not found in $APTDIR/download"

# Unpack into a fresh staging dir, then swap in, so a failed run leaves no
# half-written prefix behind.
STAGE="$(mktemp -d "${PREFIX%/*}/.ctr-remote.XXXXXX" 2>/dev/null || true)"
if [[ -z "$STAGE" ]]; then
    mkdir -p "${PREFIX%/*}"
    STAGE="$(mktemp -d "${PREFIX%/*}/.ctr-remote.XXXXXX")"
fi
trap 'rm -rf "$STAGE"' EXIT
dpkg -x "$DEB" "$STAGE" || die "dpkg -x $DEB failed"
[[ -x "$STAGE/usr/bin/ctr-remote" ]] || die "$DEB has no usr/bin/ctr-remote"
dpkg-deb -f "$DEB" Version >"$STAGE/PACKAGE-VERSION"
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
trap - EXIT

version_ok \
    || die "$BIN does not run or is not from a $WANT_VERSION package" \
           "(package $(cat "$STAMP" 2>/dev/null || echo '?'); --version: $("$BIN" --version 2>&1 || true))"
log "installed: stargz-snapshotter $(cat "$STAMP"), $("$BIN" --version)"
echo "$BIN"
