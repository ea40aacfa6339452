"""Images for the workload-analyzer tests of every runner, and what they share: the
workload kinds (`KINDS`: exit, --period, --wait-on-line) with the records they must
give, and reading a record or what a run prioritized.

Layer tars are docker-style: every parent directory has its own entry before what it
holds. Entries are given as a list of :class:`E` (file, dir, symlink, whiteout, ...), so a
test can also write what a hostile image would (absolute symlinks, ``..`` names).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from support import imagefactory as f
from support.cli import run_cli
from support.containerd import Containerd
from support.ociimage import image_target

MTIME = f.LAYER_MTIME


@dataclass(frozen=True)
class E:
    """One tar entry: kind is "file", "dir", "symlink" or "fifo"."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""  # symlink target
    mode: int = 0
    owner: int = 0  # uid and gid


def file(name: str, data: bytes | str, mode: int = 0o644, owner: int = 0) -> E:
    return E(name, "file", data.encode() if isinstance(data, str) else data, mode=mode,
             owner=owner)


def script(name: str, text: str) -> E:
    return file(name, text, 0o755)


def dir_(name: str) -> E:
    return E(name.rstrip("/") + "/", "dir", mode=0o755)


def symlink(name: str, target: str) -> E:
    return E(name, "symlink", target=target, mode=0o777)


def fifo(name: str) -> E:
    return E(name, "fifo", mode=0o644)


def whiteout(name: str) -> E:
    """Deletes *name* of the layers below (``dir/.wh.name``)."""
    head, _, base = name.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")


def opaque(directory: str) -> E:
    """Hides everything below *directory* in the layers below (``dir/.wh..wh..opq``)."""
    return file(directory.rstrip("/") + "/.wh..wh..opq", b"")


def layer(entries: Iterable[E], *, add_parents: bool = True) -> bytes:
    """A PAX layer tar of *entries*, in order; missing parent directories are added first
    (unless add_parents is False: then the tar holds exactly the entries given)."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            if add_parents:
                parts = e.name.rstrip("/").split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d and d not in seen and d not in ("..", "."):
                        seen.add(d)
                        _add(tar, dir_(d))
            if e.kind == "dir":
                seen.add(e.name.rstrip("/"))
            _add(tar, e)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, e: E) -> None:
    info = tarfile.TarInfo(e.name.rstrip("/") if e.kind == "dir" else e.name)
    info.mtime = MTIME
    info.uid = info.gid = e.owner
    info.uname = info.gname = "root" if e.owner == 0 else ""
    info.mode = e.mode
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif e.kind == "fifo":
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    elif e.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = e.target
        tar.addfile(info)
    else:
        info.size = len(e.data)
        tar.addfile(info, io.BytesIO(e.data))


def layer_names(raw: bytes) -> set[str]:
    """The names a layer tar holds, as written (no leading "./", no trailing "/")."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()}


@dataclass(frozen=True)
class Image:
    name: str  # in containerd
    layout: Path
    tag: str
    manifest: str
    layers: tuple[bytes, ...]  # uncompressed layer tars, bottom first


def build(c: Containerd, base: Path, name: str, layers: Sequence[bytes],
          config: dict, tag: str = "v1") -> Image:
    """Write an OCI layout under *base* and import it into containerd as *name*."""
    layout = base / "layout"
    manifest = f.write_layout(layout, tag, list(layers), config)
    archive = f.archive_for_ctr(layout, tag, name, base / "image.tar")
    c.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive))
    assert image_target(c, name) == manifest
    return Image(name, layout, tag, manifest, tuple(layers))


def config(cmd: Sequence[str] = (), entrypoint: Sequence[str] = (), **extra) -> dict:
    cfg: dict = {"Env": ["PATH=/bin"], "WorkingDir": "/"}
    if cmd:
        cfg["Cmd"] = list(cmd)
    if entrypoint:
        cfg["Entrypoint"] = list(entrypoint)
    cfg.update(extra)
    return {"config": cfg}


BB = ("bin/busybox", 0)


def read_record(path: Path) -> list[dict]:
    assert path.is_file(), f"no record at {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pairs(record: list[dict]) -> list[tuple[str, int]]:
    return [(r["path"], r["layerIndex"]) for r in record]


def inspect(c: Containerd, image: str) -> list[dict]:
    res = run_cli("-a", c.address, "inspect", image, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["layers"]


def prioritized(c: Containerd, image: str) -> list[list[str]]:
    """Per layer, the regular files before the landmark (directories left out)."""
    out = []
    for lay in inspect(c, image):
        out.append([p for p in lay["prioritized"] if not p.endswith("/")])
    return out


def expected_prioritized(record: list[dict], layers: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(layers)]
    for path, index in pairs(record):
        out[index].append(path)
    return out


def ended_by(stderr: str) -> str:
    m = re.search(r"workload ended \(([^)]*)\)", stderr)
    assert m, f"no 'workload ended' line:\n{stderr}"
    return m[1]


RUN_SH = """\
cat /app/a.txt
case "$1" in
  exit) echo done-exit ;;
  sleep) cat /app/b.txt; echo sleeping; exec /bin/busybox sleep 1000 ;;
  ready) cat /app/c.txt; echo READY; exec /bin/busybox sleep 1000 ;;
esac
"""


KIND_OUTPUT = "alpha-upper\ndone-exit\n"


KINDS = {
    # name: (flags, expected record set, period, how it ends, output on stderr)
    "exit": ([], {BB, ("app/run.sh", 1), ("app/a.txt", 2)}, 10,
             "the workload exited", "done-exit"),
    "period": (["--args", '["/bin/sh","/app/run.sh","sleep"]'],
               {BB, ("app/run.sh", 1), ("app/a.txt", 2), ("app/b.txt", 1)}, 2,
               "the --period elapsed", "sleeping"),
    "line": (["--args", '["/bin/sh","/app/run.sh","ready"]', "--wait-on-line", "READY"],
             {BB, ("app/run.sh", 1), ("app/a.txt", 2), ("app/c.txt", 2)}, 30,
             "the --wait-on-line text was printed", "READY"),
}
