#!/usr/bin/env bash
# Regenerate the containerd API message modules from our minimal .proto files:
#   src/estargz_opt/stores/containerd/protos/*.proto  ->  .../containerd/_pb/*_pb2.py
# Usage: scripts/gen-protos.sh [OUTDIR]   (default: the committed _pb package)
#
# Needs grpcio-tools (a development tool only: the generated modules are
# committed, so users need just protobuf and grpcio at run time).
#
# The .proto files are mapped to the virtual path estargz_opt/stores/containerd/_pb,
# so the files registered in protobuf's default pool have names no other
# package will use, and imports between the generated modules are absolute
# imports of this package.
#
# Only message modules (and their .pyi type stubs) are generated (no *_pb2_grpc.py): client.py builds its
# RPC stubs from the method table it declares, so the committed code does not
# demand the grpcio release that generated it. For the same reason the
# runtime-version assertion that recent protoc versions emit is removed: it
# would make the modules refuse every protobuf older than the generator,
# while the builder API they use exists in every protobuf we support (>=4.25).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PKG=estargz_opt/stores/containerd
PROTOS="$ROOT/src/$PKG/protos"
OUT="${1:-$ROOT/src/$PKG/_pb}"
# The project's venv (make test creates it), where grpcio-tools is installed.
PYTHON="${PYTHON:-${VENV:-$ROOT/.venv}/bin/python}"
command -v "$PYTHON" >/dev/null || { echo "gen-protos: $PYTHON not found: run make test once (it creates .venv) or set PYTHON" >&2; exit 1; }

"$PYTHON" -c 'import grpc_tools.protoc' 2>/dev/null \
    || { echo "gen-protos: grpcio-tools is missing (it is in the project's test extras: make test installs them)" >&2; exit 1; }
WKT="$("$PYTHON" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

mapfile -t FILES < <(cd "$PROTOS" && ls -1 ./*.proto | LC_ALL=C sort)
"$PYTHON" -m grpc_tools.protoc \
    "-I$PKG/_pb=$PROTOS" "-I$WKT" \
    --python_out="$TMP" --pyi_out="$TMP" \
    "${FILES[@]/#./$PROTOS}"

mkdir -p "$OUT"
rm -f "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi
"$PYTHON" - "$TMP/$PKG/_pb" "$OUT" <<'PY'
import pathlib
import re
import sys

src, out = map(pathlib.Path, sys.argv[1:])
check = re.compile(
    r"^from google\.protobuf import runtime_version as _runtime_version\n"
    r"|^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n",
    re.M,
)
for path in sorted(src.glob("*_pb2.py")):
    text = path.read_text()
    text, n = check.subn("", text)
    if n != 2 and "_runtime_version" in text:
        sys.exit(f"gen-protos: cannot remove the runtime version check from {path.name}")
    # The generator's version would make every regeneration a diff; the
    # drift test compares descriptors, not this line.
    text = re.sub(r"^# Protobuf Python Version: .*\n", "", text, flags=re.M)
    # Generated code is not held to our lint rules.
    text = "# ruff: noqa\n" + text
    (out / path.name).write_text(text)
# The type stubs let mypy --strict check the client's use of the messages.
for path in sorted(src.glob("*_pb2.pyi")):
    (out / path.name).write_text("# ruff: noqa\n" + path.read_text())
PY
[[ -f "$OUT/__init__.py" ]] || printf '"""Generated protobuf modules (scripts/gen-protos.sh); do not edit."""\n' >"$OUT/__init__.py"
echo "gen-protos: wrote $(ls "$OUT"/*_pb2.py | wc -l) modules to $OUT" >&2
