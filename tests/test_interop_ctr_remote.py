"""Interop with the reference reader: upstream's ctr-remote 0.14.3.

Each case converts a layer with ``estargz-opt layer convert``, puts the blob
into a private containerd's content store, and asks
``ctr-remote images get-toc-digest [--zstdchunked] <blob digest>`` for the TOC
digest: upstream's reader must find our footer, decompress our TOC and hash it
to exactly the tocDigest we reported. With ``--dump-toc`` it prints the TOC it
parsed, which must be the same JSON as ``estargz-opt layer toc``.

External TOC: ``get-toc-digest`` has no option to take a TOC from elsewhere
(its only options are --zstdchunked and --dump-toc) and only knows the
in-blob gzip and zstd:chunked footers, so it cannot read an external-TOC
layer as is. Upstream's external TOC blob is, byte for byte, the TOC gzip
member that an in-blob eStargz layer carries, and the layer is the same
payload with a 46-byte footer instead. So for that format the test rebuilds
the equivalent in-blob layer (payload + TOC blob + 51-byte eStargz footer)
and lets ctr-remote read *that*, which checks the TOC blob with upstream's
parser, and also checks the layer and TOC blob with our own
``estargz-opt layer verify BLOB --toc FILE --toc-digest D``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import invoke
from support.containerd import NAMESPACE, file_digest
from support.layers import BUSYBOX_PRIORITIZED, SYNTHETIC_PRIORITIZED, write_list

pytestmark = pytest.mark.interop

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
EXTERNAL_TOC_FOOTER_SIZE = 46


@dataclass(frozen=True)
class Case:
    id: str
    format: str
    prioritized: bool = False
    extra: tuple[str, ...] = ()

    @property
    def zstd(self) -> bool:
        return self.format == "zstdchunked"

    @property
    def external(self) -> bool:
        return self.format == "estargz-external-toc"


CASES = [
    Case("estargz", "estargz"),
    Case("estargz-prio", "estargz", prioritized=True),
    Case("estargz-minchunk", "estargz", extra=("--min-chunk-size", "65536")),
    Case("estargz-minchunk-prio", "estargz", prioritized=True,
         extra=("--min-chunk-size", "65536")),
    Case("estargz-chunk1m-level1", "estargz",
         extra=("--chunk-size", str(1 << 20), "--compression-level", "1")),
    Case("zstdchunked", "zstdchunked"),
    Case("zstdchunked-prio", "zstdchunked", prioritized=True),
    Case("external-toc", "estargz-external-toc"),
    Case("external-toc-prio", "estargz-external-toc", prioritized=True),
]
LAYERS = ["busybox", "synthetic"]


@pytest.fixture(scope="module")
def layer_src(busybox_layer: Path, synthetic_layer: Path):
    def get(name: str) -> tuple[Path, tuple[str, ...]]:
        if name == "busybox":
            return busybox_layer, BUSYBOX_PRIORITIZED
        return synthetic_layer, SYNTHETIC_PRIORITIZED
    return get


def convert(src: Path, out: Path, case: Case, prioritized: tuple[str, ...],
            workdir: Path) -> tuple[dict, Path | None]:
    args = ["layer", "convert", str(src), str(out), "--format", case.format, *case.extra]
    if case.prioritized:
        args += ["--prioritized-files", str(write_list(workdir / "prio.txt", prioritized))]
    toc_out = None
    if case.external:
        toc_out = workdir / "toc.blob"
        args += ["--toc-out", str(toc_out)]
    res = invoke(*args, check=True)
    try:
        desc = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"convert did not print one JSON object: {res.stdout!r}") from e
    return desc, toc_out


def get_toc_digest(ctr_remote: Path, containerd, digest: str, *, zstd: bool = False,
                   dump: bool = False) -> str:
    cmd = [str(ctr_remote), "-a", containerd.address, "-n", NAMESPACE,
           "images", "get-toc-digest"]
    if zstd:
        cmd.append("--zstdchunked")
    if dump:
        cmd.append("--dump-toc")
    cmd.append(digest)
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=300)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\n"
        f"stderr:\n{res.stderr}")
    return res.stdout


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at a TOC member at *toc_offset*:
    an empty gzip member whose FEXTRA field is 'SG', LEN 22, then the offset as
    16 lowercase hex digits and 'STARGZ'."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + len(subfield).to_bytes(2, "little") + subfield
    header = bytes([0x1F, 0x8B, 0x08, 0x04, 0, 0, 0, 0, 0x00, 0xFF])
    footer = (header + len(extra).to_bytes(2, "little") + extra
              + b"\x01\x00\x00\xff\xff" + bytes(8))
    assert len(footer) == 51
    return footer


def check_descriptor(desc: dict, out: Path) -> None:
    for key in ("digest", "size", "diffID", "uncompressedSize", "tocDigest", "annotations"):
        assert key in desc, f"convert output lacks {key!r}: {desc}"
    assert desc["digest"] == file_digest(out)
    assert desc["size"] == out.stat().st_size
    assert desc["tocDigest"].startswith("sha256:") and len(desc["tocDigest"]) == 71
    ann = desc["annotations"]
    assert ann.get(TOC_DIGEST_ANNOTATION) == desc["tocDigest"]
    assert ann.get(UNCOMPRESSED_SIZE_ANNOTATION) == str(desc["uncompressedSize"])


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ctr_remote_reads_our_toc(case: Case, layer: str, layer_src, containerd,
                                  ctr_remote: Path, tmp_path: Path) -> None:
    src, prioritized = layer_src(layer)
    out = tmp_path / "layer.blob"
    desc, toc_out = convert(src, out, case, prioritized, tmp_path)
    check_descriptor(desc, out)
    toc_digest = desc["tocDigest"]

    # Our own TOC view, to compare with what upstream's reader dumps.
    toc_args = ["layer", "toc", str(out)] + (["--toc", str(toc_out)] if toc_out else [])
    our_toc = json.loads(invoke(*toc_args, check=True).stdout)

    if case.external:
        # See the module docstring: ctr-remote cannot read an external TOC.
        assert toc_out is not None and toc_out.is_file(), "--toc-out wrote no TOC blob"
        invoke("layer", "verify", str(out), "--toc", str(toc_out),
                    "--toc-digest", toc_digest, check=True)
        blob = out.read_bytes()
        payload = blob[:-EXTERNAL_TOC_FOOTER_SIZE]
        assert blob[-EXTERNAL_TOC_FOOTER_SIZE:][16:33] == b"STARGZEXTERNALTOC"
        rebuilt = tmp_path / "rebuilt-in-blob.blob"
        rebuilt.write_bytes(payload + toc_out.read_bytes() + estargz_footer(len(payload)))
        digest = containerd.ingest(rebuilt)
    else:
        digest = containerd.ingest(out)
        assert digest == desc["digest"]

    printed = get_toc_digest(ctr_remote, containerd, digest, zstd=case.zstd).strip()
    assert printed == toc_digest, f"ctr-remote says {printed}, we said {toc_digest}"

    dumped = get_toc_digest(ctr_remote, containerd, digest, zstd=case.zstd, dump=True)
    assert json.loads(dumped) == our_toc


@pytest.mark.parametrize("layer", LAYERS)
def test_external_toc_matches_in_blob_layer(layer: str, layer_src, tmp_path: Path) -> None:
    """The external-TOC layer is the in-blob layer split in two: same payload,
    and the TOC blob is the in-blob TOC member (the reference's own layout)."""
    src, prioritized = layer_src(layer)
    ext_desc, toc_out = convert(src, tmp_path / "ext.blob",
                                Case("x", "estargz-external-toc", prioritized=True),
                                prioritized, tmp_path)
    in_desc, _ = convert(src, tmp_path / "in.blob", Case("i", "estargz", prioritized=True),
                         prioritized, tmp_path)
    assert ext_desc["tocDigest"] == in_desc["tocDigest"]
    ext = (tmp_path / "ext.blob").read_bytes()
    payload = ext[:-EXTERNAL_TOC_FOOTER_SIZE]
    assert toc_out is not None
    assert payload + toc_out.read_bytes() + estargz_footer(len(payload)) == \
        (tmp_path / "in.blob").read_bytes()
