"""Signatures of a converted image, with Debian trixie's cosign 2.5 and oras 1.2 against a
loopback docker-registry with TLS (2.8: no referrers API, so referrers go through the tag
schema): a signed source is never converted silently, its signatures are not copied (they
would not verify), and re-signing the printed digest makes the converted image verify."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import imagefactory as f, trixie
from support.cli import cli_argv, cli_env
from support.hostile import HostileServer, answer
from support.lazypull import Registry, RegistryConfig, Unavailable
from support.registries import LoopbackCA

from estargz_opt.constants import SOURCE_DIGEST_ANNOTATION as SOURCE_DIGEST

pytestmark = [pytest.mark.root, pytest.mark.registry, pytest.mark.slow]

SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"


@dataclass
class World:
    share: Path
    registry: Registry
    home: Path  # its certs.d trusts the test CA, for estargz-opt

    def tool(self, cmd: str) -> subprocess.CompletedProcess[str]:
        """cosign or oras in the trixie root, trusting the test CA, keys in /share/keys."""
        return trixie.run(
            "export SSL_CERT_FILE=/share/ca/ca.crt COSIGN_PASSWORD= COSIGN_YES=true; "
            f"cd /share/keys && {cmd}", self.share, timeout=300)

    def optimize(self, src: str, dst: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli_argv("optimize", "--oci", "--no-optimize"), *args,
             f"docker://{self.registry.host}/{src}", f"docker://{self.registry.host}/{dst}"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
            env=cli_env(HOME=str(self.home)))

    def push(self, repo: str, layers: list[bytes]) -> str:
        """A new image in the registry (via a layout); its manifest digest."""
        layout = self.share / f"layout-{repo}"
        digest = f.write_layout(layout, "1", layers, {"config": {"Cmd": ["/bin/true"]}})
        res = self.tool(f"oras cp --from-oci-layout /share/{layout.name}:1 "
                        f"{self.registry.host}/{repo}:1")
        assert res.returncode == 0, res.stderr
        return digest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        trixie.ensure_root()
    except trixie.TrixieUnavailable as exc:
        pytest.skip(str(exc))
    share = tmp_path_factory.mktemp("supply")
    ca = LoopbackCA.create(share / "ca")
    try:
        registry = Registry.start(share, RegistryConfig(ca.server_crt, ca.server_key, ca.ca_crt))
    except Unavailable as exc:
        pytest.skip(str(exc))
    home = share / "home"
    ca.certs_d(home / ".config/containers/certs.d", registry.host)
    (share / "keys").mkdir()
    w = World(share, registry, home)
    try:
        res = w.tool("cosign generate-key-pair")
        assert res.returncode == 0, res.stderr
        yield w
    finally:
        registry.stop()


def verify(world: World, ref: str) -> subprocess.CompletedProcess[str]:
    return world.tool(f"cosign verify --key cosign.pub --insecure-ignore-tlog=true "
                      f"{world.registry.host}/{ref}")


def report(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cosign_signed_source_warns_and_resigning_verifies(world: World) -> None:
    src = world.push("signed", [f.simple_layer({"etc/a": b"a\n"})])
    res = world.tool("cosign sign --key cosign.key --tlog-upload=false "
                     f"{world.registry.host}/signed@{src}")
    assert res.returncode == 0, res.stderr
    assert verify(world, f"signed@{src}").returncode == 0

    proc = world.optimize("signed:1", "signed:1-esgz", "--json")
    doc = report(proc)
    new = doc["target"]
    tag = "sha256-" + src.split(":", 1)[1] + ".sig"
    assert doc["signatures"]["found"] is True
    assert doc["signatures"]["kinds"] == ["cosign-tag"]
    assert doc["signatures"]["signatures"] == [
        {"subject": src, "kind": "cosign-tag", "name": tag}]
    resign = f"cosign sign {world.registry.host}/signed@{new}"
    assert any(tag in line and resign in line for line in proc.stderr.splitlines()), proc.stderr

    failed = verify(world, f"signed@{new}")
    assert failed.returncode != 0 and "no signatures found" in failed.stderr, failed.stderr
    res = world.tool("cosign sign --key cosign.key --tlog-upload=false "
                     f"{world.registry.host}/signed@{new}")
    assert res.returncode == 0, res.stderr
    assert verify(world, f"signed@{new}").returncode == 0


def test_referrer_signature_is_found(world: World) -> None:
    """A signature attached as an OCI referrer (oras attach: the tag-schema fallback on
    this registry) is found too; an SBOM referrer is no signature."""
    src = world.push("refsig", [f.simple_layer({"etc/b": b"b\n"})])
    (world.share / "keys" / "sig.json").write_text("{}")
    for artifact in (SIG_ARTIFACT, "application/spdx+json"):
        res = world.tool(f"oras attach --artifact-type {artifact} "
                         f"{world.registry.host}/refsig@{src} sig.json:application/json")
        assert res.returncode == 0, res.stderr
    doc = report(world.optimize("refsig:1", "refsig:1-esgz", "--json"))
    sigs = doc["signatures"]
    assert sigs["found"] is True and sigs["kinds"] == ["oci-referrer"], sigs
    assert len(sigs["signatures"]) == 1 and sigs["signatures"][0]["subject"] == src, sigs


def test_unsigned_source_reports_none(world: World) -> None:
    world.push("plain", [f.simple_layer({"etc/c": b"c\n"})])
    proc = world.optimize("plain:1", "plain:1-esgz", "--json")
    sigs = report(proc)["signatures"]
    assert sigs == {"found": False, "kinds": [], "signatures": [], "unchecked": {}}, sigs
    assert "signed" not in proc.stderr, proc.stderr


def test_signature_tag_on_garbage_still_counts(world: World) -> None:
    """The cosign tag is looked at, not read: a tag naming a manifest that is no signature
    is still reported (the user decides), and the conversion is not stopped."""
    src = world.push("garbage", [f.simple_layer({"etc/d": b"d\n"})])
    other = world.push("garbage-other", [f.simple_layer({"etc/e": b"e\n"})])
    tag = "sha256-" + src.split(":", 1)[1] + ".sig"
    res = world.tool(f"oras cp {world.registry.host}/garbage-other@{other} "
                     f"{world.registry.host}/garbage:{tag}")
    assert res.returncode == 0, res.stderr
    sigs = report(world.optimize("garbage:1", "garbage:1-esgz", "--json"))["signatures"]
    assert sigs["kinds"] == ["cosign-tag"], sigs


def test_with_referrer_lists_converted_under_source(world: World) -> None:
    """--with-referrer: the converted manifest's subject is the source, so that oras
    discover on the source lists it (here through the tag-schema index we update)."""
    src = world.push("linked", [f.simple_layer({"etc/f": b"f\n"})])
    doc = report(world.optimize("linked:1", "linked:1-esgz", "--json", "--with-referrer"))
    new = doc["target"]
    res = world.tool(f"oras discover --format json {world.registry.host}/linked@{src}")
    assert res.returncode == 0, res.stderr
    listed = [m["digest"] for m in json.loads(res.stdout)["manifests"]]
    assert listed == [new], res.stdout
    res = world.tool(f"oras manifest fetch {world.registry.host}/linked@{new}")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["subject"]["digest"] == src
    # Without the flag, the converted image names nothing.
    doc = report(world.optimize("linked:1", "linked:1-plain", "--json"))
    res = world.tool(f"oras manifest fetch {world.registry.host}/linked@{doc['target']}")
    assert "subject" not in json.loads(res.stdout)


def test_referrers_index_not_json_is_a_warning(world: World, tmp_path: Path) -> None:
    """A registry whose referrers API answers garbage: the check is incomplete, which the
    warning and `unchecked` say in one line; the conversion (informational data) goes on."""
    plain = Registry.start(tmp_path)
    try:
        with HostileServer(upstream=plain.host) as front:
            front.on("GET", r"/referrers/", answer(200, b"not json {",
                                                   {"Content-Type": f.OCI_INDEX}))
            f.write_layout(world.share / "layout-hostile", "1",
                           [f.simple_layer({"etc/g": b"g\n"})])
            res = world.tool("oras cp --to-plain-http --from-oci-layout "
                             f"/share/layout-hostile:1 {plain.host}/r:1")
            assert res.returncode == 0, res.stderr
            done = subprocess.run(
                [*cli_argv("optimize", "--oci", "--no-optimize"),
                 "--json", "--src-tls-verify=false", "--dest-tls-verify=false",
                 f"docker://{front.host}/r:1", f"docker://{front.host}/r:1-esgz"],
                capture_output=True, text=True, timeout=300)
            src = report(done)
            assert src["signatures"]["found"] is False
            (why,) = src["signatures"]["unchecked"].values()
            assert "JSON" in why, why
            warned = [w for w in src["warnings"] if "could not check source" in w]
            assert len(warned) == 1 and "\n" not in warned[0], src["warnings"]
    finally:
        plain.stop()


def test_layout_referrer_naming_a_missing_blob_is_a_warning(tmp_path: Path) -> None:
    """In an OCI layout, a referrer entry whose manifest blob is missing: the signature
    check says it could not finish; the converted image is written whole."""
    layout = tmp_path / "layout"
    digest = f.write_layout(layout, "1", [f.simple_layer({"etc/h": b"h\n"})])
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({"mediaType": f.OCI_MANIFEST, "size": 100,
                               "digest": "sha256:" + "0" * 64})
    (layout / "index.json").write_text(json.dumps(index))
    done = subprocess.run(
        [*cli_argv("optimize", "--oci", "--no-optimize"), "--json",
         f"oci:{layout}:1", f"oci:{tmp_path}/out:1"], capture_output=True, text=True,
        timeout=300)
    doc = report(done)
    assert list(doc["signatures"]["unchecked"]) == [digest], doc["signatures"]
    assert sum("could not check source" in line for line in done.stderr.splitlines()) == 1
    assert f.resolve_tag(tmp_path / "out", "1")["digest"] == doc["target"]


def test_sbom_referrer_follows_the_converted_image(world: World) -> None:
    """An SBOM attached by oras (tag schema on this registry) is attached to the converted
    manifest too, its blob unchanged, the source digest kept in an annotation."""
    src = world.push("sbom", [f.simple_layer({"etc/i": b"i\n"})])
    (world.share / "keys" / "sbom.spdx.json").write_text('{"spdxVersion": "SPDX-2.3"}')
    res = world.tool(f"oras attach --artifact-type application/spdx+json "
                     f"{world.registry.host}/sbom@{src} sbom.spdx.json:application/spdx+json")
    assert res.returncode == 0, res.stderr
    new = report(world.optimize("sbom:1", "sbom:1-esgz", "--json"))["target"]

    def discover(digest: str) -> list[dict]:
        res = world.tool(f"oras discover --format json {world.registry.host}/sbom@{digest}")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["manifests"]

    (old_ref,), (new_ref,) = discover(src), discover(new)
    assert new_ref["artifactType"] == old_ref["artifactType"] == "application/spdx+json"
    fetched = {}
    for name, ref in (("old", old_ref), ("new", new_ref)):
        res = world.tool(f"oras manifest fetch {world.registry.host}/sbom@{ref['digest']}")
        assert res.returncode == 0, res.stderr
        fetched[name] = json.loads(res.stdout)
    assert fetched["new"]["subject"]["digest"] == new
    assert fetched["new"]["layers"] == fetched["old"]["layers"]
    assert fetched["new"]["annotations"][SOURCE_DIGEST] == src
    # --drop-attestations: nothing follows.
    dropped = report(world.optimize("sbom:1", "sbom:1-drop", "--json", "--drop-attestations",
                                    "--estargz-compression-level", "1"))["target"]
    assert dropped != new and discover(dropped) == []


def test_attest_statement_names_every_layer(world: World) -> None:
    """--attest: oras discover lists an in-toto statement on the converted image; it names
    each layer's source and converted digests, which match the two manifests."""
    src = world.push("attest", [f.simple_layer({"etc/j": b"j\n"}),
                                f.simple_layer({"etc/k": b"k\n"})])
    new = report(world.optimize("attest:1", "attest:1-esgz", "--json", "--attest"))["target"]
    res = world.tool(f"oras discover --format json {world.registry.host}/attest@{new}")
    assert res.returncode == 0, res.stderr
    (ref,) = json.loads(res.stdout)["manifests"]
    assert ref["artifactType"] == "application/vnd.in-toto+json"
    res = world.tool(f"oras manifest fetch {world.registry.host}/attest@{ref['digest']}")
    assert res.returncode == 0, res.stderr
    (blob,) = json.loads(res.stdout)["layers"]
    res = world.tool(f"oras blob fetch --output - {world.registry.host}/attest@{blob['digest']}")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    pred = doc["predicate"]
    assert doc["subject"][0]["digest"]["sha256"] == new.split(":", 1)[1]
    assert (pred["source"]["digest"], pred["converted"]["digest"]) == (src, new)

    def layers(digest: str) -> list[str]:
        res = world.tool(f"oras manifest fetch {world.registry.host}/attest@{digest}")
        assert res.returncode == 0, res.stderr
        return [lay["digest"] for lay in json.loads(res.stdout)["layers"]]

    assert [lay["source"]["digest"] for lay in pred["layers"]] == layers(src)
    assert [lay["converted"]["digest"] for lay in pred["layers"]] == layers(new)
    assert all(lay["diffID"] and lay["tocDigest"] for lay in pred["layers"]), pred
    assert pred["format"] == "estargz" and pred["builder"]["name"] == "estargz-opt"


def test_cosign_referrer_signature_warns_and_resigning_verifies(world: World) -> None:
    """cosign's OCI 1.1 mode (a referrer, the tag schema on this registry): found, and
    the converted digest verifies only once re-signed."""
    src = world.push("signed11", [f.simple_layer({"etc/l": b"l\n"})])
    sign = ("COSIGN_EXPERIMENTAL=1 cosign sign --key cosign.key --tlog-upload=false "
            "--registry-referrers-mode=oci-1-1 " + world.registry.host + "/signed11@{}")
    check = ("COSIGN_EXPERIMENTAL=1 cosign verify --key cosign.pub --insecure-ignore-tlog=true "
             "--experimental-oci11 " + world.registry.host + "/signed11@{}")
    res = world.tool(sign.format(src))
    assert res.returncode == 0, res.stderr
    assert world.tool(check.format(src)).returncode == 0
    proc = world.optimize("signed11:1", "signed11:1-esgz", "--json")
    doc = report(proc)
    assert doc["signatures"]["kinds"] == ["oci-referrer"], doc["signatures"]
    assert any("is signed" in line and doc["target"] in line
               for line in proc.stderr.splitlines()), proc.stderr
    assert world.tool(check.format(doc["target"])).returncode != 0
    assert world.tool(sign.format(doc["target"])).returncode == 0
    assert world.tool(check.format(doc["target"])).returncode == 0


def test_layout_signature_tag_is_found(tmp_path: Path) -> None:
    """In an OCI layout, cosign's tag names an entry of index.json: found the same way."""
    layout = tmp_path / "layout"
    digest = f.write_layout(layout, "1", [f.simple_layer({"etc/m": b"m\n"})])
    sig = f.write_layout(layout, "sha256-" + digest.split(":", 1)[1] + ".sig",
                         [f.simple_layer({"sig": b"s\n"})])
    done = subprocess.run(
        [*cli_argv("optimize", "--oci", "--no-optimize", "--json"), f"oci:{layout}:1",
         f"oci:{tmp_path}/out:1"], capture_output=True, text=True, timeout=300)
    sigs = report(done)["signatures"]
    assert sigs["kinds"] == ["cosign-tag"] and sigs["signatures"][0]["subject"] == digest
    assert sig not in (tmp_path / "out" / "index.json").read_text()


def test_attest_into_layout_and_archive(tmp_path: Path) -> None:
    """A layout lists the statement in index.json (untagged, its subject the converted
    image); an archive keeps no referrers: a warning says the statement was left out."""
    layout = tmp_path / "layout"
    f.write_layout(layout, "1", [f.simple_layer({"etc/n": b"n\n"})])
    argv = cli_argv("optimize", "--oci", "--no-optimize", "--json", "--attest")
    doc = report(subprocess.run([*argv, f"oci:{layout}:1", f"oci:{tmp_path}/out:1"],
                                capture_output=True, text=True, timeout=300))
    entries = json.loads((tmp_path / "out" / "index.json").read_text())["manifests"]
    (statement,) = [m for m in entries if m.get("artifactType") == "application/vnd.in-toto+json"]
    manifest = json.loads(f.read_blob(tmp_path / "out", statement["digest"]))
    assert manifest["subject"]["digest"] == doc["target"]
    done = subprocess.run([*argv, f"oci:{layout}:1", f"oci-archive:{tmp_path}/out.tar:1"],
                          capture_output=True, text=True, timeout=300)
    warned = [w for w in report(done)["warnings"] if "keeps no OCI referrers" in w]
    assert warned and "conversion attestation" in warned[0], done.stderr


def test_sbom_referrer_naming_a_missing_blob_fails_whole(tmp_path: Path) -> None:
    """An SBOM referrer whose blob is missing would be copied half: one line, exit 1, and
    the destination is not written (no tag, no layout)."""
    layout = tmp_path / "layout"
    digest = f.write_layout(layout, "1", [f.simple_layer({"etc/o": b"o\n"})])
    size = len(f.read_blob(layout, digest))
    config = f.put_blob(layout, b"{}")
    sbom = {"schemaVersion": 2, "mediaType": f.OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": f.descriptor("application/vnd.oci.empty.v1+json", *config),
            "layers": [f.descriptor("application/spdx+json", "sha256:" + "1" * 64, 10)],
            "subject": f.descriptor(f.OCI_MANIFEST, digest, size)}
    ref = f.descriptor(f.OCI_MANIFEST, *f.put_json(layout, sbom))
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append(ref)
    (layout / "index.json").write_text(json.dumps(index))
    done = subprocess.run(
        [*cli_argv("optimize", "--oci", "--no-optimize"), f"oci:{layout}:1",
         f"oci:{tmp_path}/out:1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    (last,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "1111" in last and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
