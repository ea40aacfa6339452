#!/usr/bin/env bash
# Demo of the image pipeline, run by `make demo` (as root, after
# `scripts/install-deps.sh demo` and `scripts/install-venv.sh demo`, which
# make the checkout's .venv; PYTHON may name another Python with estargz-opt):
#   1. start a PRIVATE containerd on a temporary socket and root. It always
#      does, even when a system containerd answers at
#      /run/containerd/containerd.sock: the demo never touches the system's
#      images or content. (Its runc state goes to /run/containerd/runc, as for
#      any containerd; the container is deleted at the end.)
#   2. build a small two-layer sample image from Debian's busybox-static
#      package (layer 0: busybox; layer 1: an app script and its config; the
#      config's Cmd runs the script, which prints one line) as an OCI layout,
#      and import it with `ctr images import`;
#   3. run `estargz-opt -a SOCK optimize --oci --period 5 --record-out REC SRC DST`:
#      the app runs in a sample container under the file-access monitor, the
#      files it opens are recorded (ctr-remote --record-out format) and put
#      first in their layers;
#   4. show the new digest and, per layer, source -> converted size, media type,
#      toc.digest, the prefetch landmark and the prioritized files (from the
#      TOC of the blob, via `ctr content get` + `estargz-opt layer toc`), and
#      what the reference reader (ctr-remote 0.14.3 get-toc-digest) says;
#   5. `ctr run --rm` the optimized image.
# Everything is removed on exit, Ctrl-C included: container, containerd,
# mounts, temporary files. Takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PYTHON="${PYTHON:-${VENV:-$ROOT/.venv}/bin/python}"
CACHE="${ESTARGZ_OPT_CACHE:-/var/cache/estargz-opt}"
CTR_REMOTE="${ESTARGZ_OPT_CTR_REMOTE:-/opt/estargz-opt/ctr-remote/usr/bin/ctr-remote}"
SYSTEM_SOCK=/run/containerd/containerd.sock
SRC=docker.io/library/estargz-opt-demo:latest
DST=docker.io/library/estargz-opt-demo:latest-esgz
CID="estargz-opt-demo-$$"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "run as root (a private containerd needs it)"
[[ -x "$CTR_REMOTE" ]] || CTR_REMOTE="$("$ROOT/scripts/install-ctr-remote.sh" | tail -n1)"
command -v ctr >/dev/null || die "ctr not found: run make demo (scripts/install-deps.sh demo)"
"$PYTHON" -c 'import estargz_opt' 2>/dev/null \
    || die "$PYTHON cannot import estargz_opt: run make demo (it creates .venv)"
# This checkout's estargz-opt, not whichever one PATH finds first.
ESTARGZ_OPT=("$PYTHON" -m estargz_opt)

T0=$SECONDS
WORK="$(mktemp -d /tmp/estargz-opt-demo.XXXXXX)"
CTRD="$WORK/containerd"
SOCK=""
RAN=0
INTERRUPTED=0
cleanup() {
    local rc=$?
    # A second Ctrl-C must not cut the clean-up short (its commands inherit the ignore).
    trap '' INT TERM
    (( INTERRUPTED )) && rc=130
    if [[ -n "$SOCK" && "$RAN" -eq 1 ]]; then
        # Only if `ctr run --rm` was interrupted: leave no task, container or runc state.
        ctr -a "$SOCK" tasks kill -s SIGKILL "$CID" >/dev/null 2>&1 || true
        ctr -a "$SOCK" tasks rm -f "$CID" >/dev/null 2>&1 || true
        ctr -a "$SOCK" containers rm "$CID" >/dev/null 2>&1 || true
    fi
    if [[ -d "$CTRD" ]]; then "$ROOT/scripts/containerd-down.sh" "$CTRD" || true; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'INTERRUPTED=1; exit 130' INT TERM

# --- 1. containerd -------------------------------------------------------------------
if [[ -S "$SYSTEM_SOCK" ]] && timeout 5 ctr -a "$SYSTEM_SOCK" version >/dev/null 2>&1; then
    SYSTEM="a system containerd answers at $SYSTEM_SOCK; the demo leaves it alone"
else
    SYSTEM="no system containerd answers at $SYSTEM_SOCK"
fi
say "private containerd in $CTRD ($SYSTEM)"
# setsid: a Ctrl-C (SIGINT to our process group) must not reach containerd, so the
# clean-up below can still talk to it; the clean-up stops it.
SOCK="$(setsid "$ROOT/scripts/containerd-up.sh" "$CTRD" | tail -n1)"
CTR=(ctr -a "$SOCK" -n default)

# --- 2. the sample image ----------------------------------------------------------------
say "sample image from Debian's busybox-static: layer 0 busybox, layer 1 the app"
mkdir -p "$CACHE/debs"
DEB="$(ls "$CACHE"/debs/busybox-static_*.deb 2>/dev/null | tail -n1 || true)"
if [[ -z "$DEB" ]]; then
    (cd "$CACHE/debs" && { apt-get -q download busybox-static \
        || { apt-get -q update && apt-get -q download busybox-static; }; }) >&2 \
        || die "cannot download busybox-static"
    DEB="$(ls "$CACHE"/debs/busybox-static_*.deb | tail -n1)"
fi
echo "package: $(basename "$DEB")" >&2

L0="$WORK/rootfs0" L1="$WORK/rootfs1"
mkdir -p "$L0" "$L1/app" "$L1/etc/demo-app"
dpkg -x "$DEB" "$L0"
ln -s busybox "$L0/bin/sh"
cat >"$L1/app/run.sh" <<'EOF'
#!/bin/sh
# The demo app: reads its config, prints one line.
. /etc/demo-app/app.conf
echo "$GREETING (colour: $COLOUR)"
EOF
chmod 755 "$L1/app/run.sh"
cat >"$L1/etc/demo-app/app.conf" <<'EOF'
GREETING="hello from the estargz-opt demo app, optimized in containerd"
COLOUR=green
EOF
cat >"$L1/app/README" <<'EOF'
Not read at start-up, so it stays behind the prefetch landmark.
EOF
# Same mtimes on every run (those of the packaged busybox), so the same .deb
# gives the same layers, digests and record.
EPOCH="$(stat -c %Y "$L0/bin/busybox")"
find "$L0" "$L1" -exec touch -h -d "@$EPOCH" {} +

# Docker-style layer tars: relative names, every parent directory has its own
# entry before its contents, numeric owners.
for i in 0 1; do
    (cd "$WORK/rootfs$i" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | tar --numeric-owner --owner=0 --group=0 --no-recursion -cf "$WORK/layer$i.tar" -T -)
done

# OCI layout (gzip layers, config with Cmd), named for `ctr images import`.
SRC_MANIFEST="$("$PYTHON" - "$WORK/oci" "$SRC" "$WORK/layer0.tar" "$WORK/layer1.tar" <<'PY'
import gzip, hashlib, json, os, platform, signal, sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C: no traceback

out, name, *tars = sys.argv[1:]
arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
    platform.machine(), platform.machine())
os.makedirs(f"{out}/blobs/sha256")

def blob(data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    with open(f"{out}/blobs/sha256/{digest}", "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

layers, diff_ids = [], []
for path in tars:
    raw = open(path, "rb").read()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    layers.append(blob(gzip.compress(raw, 9, mtime=0),
                       "application/vnd.oci.image.layer.v1.tar+gzip"))
config = {
    "architecture": arch, "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "/app/run.sh"]},
    "rootfs": {"type": "layers", "diff_ids": diff_ids},
    "history": [{"created_by": "dpkg -x busybox-static_*.deb; ln -s busybox bin/sh"},
                {"created_by": "COPY app/run.sh app/README etc/demo-app/app.conf"}],
}
cfg = blob(json.dumps(config, separators=(",", ":")).encode(),
           "application/vnd.oci.image.config.v1+json")
manifest = blob(json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": cfg, "layers": layers}, separators=(",", ":")).encode(),
    "application/vnd.oci.image.manifest.v1+json")
manifest["platform"] = {"architecture": arch, "os": "linux"}
manifest["annotations"] = {"io.containerd.image.name": name,
                           "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
with open(f"{out}/index.json", "w") as f:
    json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [manifest]}, f)
with open(f"{out}/oci-layout", "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
print(manifest["digest"])
PY
)"
tar -C "$WORK/oci" -cf "$WORK/image-oci.tar" oci-layout index.json blobs
"${CTR[@]}" images import --no-unpack "$WORK/image-oci.tar" >&2
"${CTR[@]}" images ls "name==$SRC" >&2

# --- 3. estargz-opt optimize: run the app, record what it opens, convert ---------------
say "estargz-opt optimize: run the app in a sample container, record its files, convert"
# The app runs under the file-access monitor for up to --period seconds (it exits at
# once here); what it opens goes first in each layer. --record-out keeps the record,
# which `optimize --record-in` can reuse later on any machine, even without containerd.
REC="$WORK/record.jsonl"
echo "+ estargz-opt -a $SOCK optimize --oci --period 5 --record-out $REC $SRC $DST" >&2
T_OPT=$EPOCHREALTIME
NEW_DIGEST="$("${ESTARGZ_OPT[@]}" -a "$SOCK" optimize --oci --period 5 --record-out "$REC" \
              "$SRC" "$DST" | tail -n1)"
OPT_S="$(awk -v a="$T_OPT" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
[[ "$NEW_DIGEST" == sha256:* ]] || die "estargz-opt printed no digest"
echo "record of the workload run (ctr-remote --record-out format): $REC" >&2
sed 's/^/  /' "$REC" >&2
grep -q '"path":"etc/demo-app/app.conf"' "$REC" \
    || die "the record lacks the app's config: the workload did not run as expected"
"${CTR[@]}" images ls "name==$DST" >&2

# --- 4. what happened ----------------------------------------------------------------------
say "layers: source -> converted, TOC, landmark, prioritized files, reference reader"
REPORT="$("$PYTHON" - "$SOCK" "$SRC_MANIFEST" "$NEW_DIGEST" "$WORK/blob" "$CTR_REMOTE" \
          "${ESTARGZ_OPT[@]}" <<'PY'
import json, signal, subprocess, sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C: no traceback

sock, src_digest, dst_digest, blob_path, ctr_remote, *estargz_opt = sys.argv[1:]
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
LANDMARKS = (".prefetch.landmark", ".no.prefetch.landmark")
ctr = ["ctr", "-a", sock, "-n", "default"]

def content(digest: str) -> bytes:
    return subprocess.run([*ctr, "content", "get", digest], check=True,
                          capture_output=True).stdout

src, dst = json.loads(content(src_digest)), json.loads(content(dst_digest))
print(f"source image  {src_digest}")
print(f"new image     {dst_digest}  ({dst['mediaType']})")
agree = True
for i, (a, b) in enumerate(zip(src["layers"], dst["layers"], strict=True)):
    with open(blob_path, "wb") as f:
        f.write(content(b["digest"]))
    toc = json.loads(subprocess.run([*estargz_opt, "layer", "toc", blob_path], check=True,
                                    capture_output=True).stdout)
    names = [e["name"] for e in toc["entries"]]
    landmark = next((n for n in names if n in LANDMARKS), "(none)")
    head = names[:names.index(landmark)] if landmark in names else []
    prioritized = [e["name"] for e in toc["entries"][:len(head)] if e["type"] == "reg"]
    ours = b.get("annotations", {}).get(TOC_DIGEST, "(no annotation)")
    ref = subprocess.run([ctr_remote, "-a", sock, "-n", "default", "images",
                          "get-toc-digest", b["digest"]], capture_output=True, text=True)
    ref_toc = ref.stdout.strip() if ref.returncode == 0 else f"ERROR: {ref.stderr.strip()}"
    agree &= ref_toc == ours
    print(f"layer {i}: {a['size']:,} -> {b['size']:,} bytes  {a['digest'][:19]}… -> "
          f"{b['digest'][:19]}…")
    print(f"  media type       {a['mediaType']} -> {b['mediaType']}")
    print(f"  toc.digest       {ours}")
    print(f"  ctr-remote reads {ref_toc}  ({'agrees' if ref_toc == ours else 'DIFFERS'})")
    print(f"  landmark         {landmark} (TOC entry {names.index(landmark) + 1}"
          f" of {len(names)})" if landmark in names else "  landmark         (none)")
    print(f"  prioritized      {', '.join(prioritized) or '(none)'}")
print("RESULT: the reference reader agrees on every layer" if agree
      else "RESULT: MISMATCH between estargz-opt and ctr-remote")
sys.exit(0 if agree else 3)
PY
)" || { echo "$REPORT" >&2; die "the reference reader disagrees (see above)"; }
# The table goes here, under its heading; the summary repeats only its verdict.
echo "$REPORT" >&2

# --- 5. run it ------------------------------------------------------------------------------
say "ctr run --rm $DST"
RAN=1
RUN_OUT="$("${CTR[@]}" run --rm "$DST" "$CID")"
RAN=0
echo "$RUN_OUT" >&2

say "summary"
cat <<SUMMARY
containerd : private, $SOCK ($SYSTEM)
optimize   : estargz-opt -a SOCK optimize --oci --period 5 --record-out record.jsonl $SRC $DST  (${OPT_S} s, workload run included)
record     : $(wc -l <"$REC") files recorded by running the app: $(sed -n 's/.*"path":"\([^"]*\)".*/\1/p' "$REC" | paste -sd, -)
layers     : $(grep -c '^layer ' <<<"$REPORT") converted (table above); $(tail -n1 <<<"$REPORT")
ctr run    : $RUN_OUT
SUMMARY
echo "demo took $(( SECONDS - T0 )) s; cleaning up" >&2
