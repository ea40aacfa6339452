"""`optimize --cache-ref`: machines that share nothing but a registry (a TLS docker-registry
with token auth) convert each layer once: a second machine mounts the base layers from
the cache repository, a planted, corrupt or blobless entry is ignored and converted
afresh, two machines filling one key at once both succeed, and pull-only credentials
read the cache without writing it."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fleet import CREDS, Machine, TokenRegistry, finished
from support.imagefactory import simple_layer, write_layout

from estargz_opt import descriptor as d
from estargz_opt.cache.remote import ARTIFACT_TYPE, ENTRY_TYPE, tag_of
from estargz_opt.digest import sha256_digest
from estargz_opt.stores.registry.client import Client
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.session import open_session

pytestmark = pytest.mark.registry

CACHE = "cache/layers"


@dataclass
class Fleet:
    reg: TokenRegistry
    root: Path
    images: dict[str, Path]  # name -> OCI layout (tag v1)
    #: machine A's report converting image "one" with the cache (it filled the cache)
    filled: dict[str, object]
    #: the registry's access log of A's run
    filled_log: str

    def machine(self, name: str) -> Machine:
        return Machine(self.root / name, self.reg)

    def ref(self) -> str:
        return f"docker://{self.reg.host}/{CACHE}"

    def client(self, repo: str = CACHE) -> Client:
        opts = RegistryOptions(creds=CREDS, env={"HOME": "/nonexistent", "PATH": os.defpath},
                               cert_dir=self.root / "A/home/.config/containers/certs.d"
                               / self.reg.host)
        return Client(open_session(self.reg.host, opts), repo)


def _image(d_: Path, app: bytes) -> Path:
    base1 = simple_layer({"usr/": None, "usr/lib/": None, "usr/lib/libbase.so": BASE1,
                          "usr/lib/link.so": None})
    base2 = simple_layer({"etc/": None, "etc/os-release": b"ID=fleet\n" * 100,
                          "opt/": None, "opt/data.bin": BASE2})
    write_layout(d_, "v1", [base1, base2, simple_layer({"app/": None, "app/main": app})])
    return d_


BASE1 = os.urandom(300_000)
BASE2 = os.urandom(200_000)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    reg = TokenRegistry.start(root / "reg")
    try:
        images = {name: _image(root / "src" / name, os.urandom(50_000))
                  for name in ("one", "two", "three")}
        a = Machine(root / "A", reg)
        before = len(reg.log())
        report, _ = finished(a.optimize(f"oci:{images['one']}:v1",
                                        f"docker://{reg.host}/app/one:v1",
                                        "--cache-ref", f"docker://{reg.host}/{CACHE}"))
        yield Fleet(reg, root, images, report, reg.log()[before:])
    finally:
        reg.stop()


def _layers(report: dict[str, object]) -> list[dict[str, object]]:
    layers = report["layers"]
    assert isinstance(layers, list)
    return layers


def _targets(report: dict[str, object]) -> list[str]:
    return [str(lay["target"]["digest"]) for lay in _layers(report)]  # type: ignore[index]


def test_second_machine_mounts_the_shared_base_layers(fleet: Fleet) -> None:
    assert [lay["cache"] for lay in _layers(fleet.filled)] == ["miss"] * 3
    # A uploaded each layer once, into its destination; the cache got them by mount.
    converted = _targets(fleet.filled)
    assert sorted(fleet.reg.mounts(CACHE, fleet.filled_log)) == sorted(converted)
    to_cache = {x.replace("%3A", ":") for x in fleet.reg.blob_uploads(CACHE, fleet.filled_log)}
    assert not to_cache & set(converted)
    before = len(fleet.reg.log())
    report, _ = finished(fleet.machine("B").optimize(
        f"oci:{fleet.images['two']}:v1", f"docker://{fleet.reg.host}/app/two:v1",
        "--cache-ref", fleet.ref()))
    log = fleet.reg.log()[before:]
    states = [lay["cache"] for lay in _layers(report)]
    assert states == ["remote-hit", "remote-hit", "miss"], states
    base = _targets(report)[:2]
    assert base == _targets(fleet.filled)[:2]
    assert sorted(fleet.reg.mounts("app/two", log)) == sorted(base), log
    uploaded = {x.replace("%3A", ":") for x in fleet.reg.blob_uploads("app/two", log)}
    assert not uploaded & set(base), log
    # The same bytes as a run without any cache.
    plain, _ = finished(fleet.machine("B-nocache").optimize(
        f"oci:{fleet.images['two']}:v1", f"docker://{fleet.reg.host}/app/two-plain:v1",
        "--no-cache"))
    assert _targets(plain) == _targets(report)
    assert plain["target"] == report["target"]


def _plant(fleet: Fleet, key: str, layer: d.Descriptor, meta: bytes) -> None:
    """Write the entry `key` as an attacker with push access would."""
    c = fleet.client()
    try:
        path = fleet.root / "planted-meta"
        path.write_bytes(meta)
        config = d.Descriptor(ENTRY_TYPE, sha256_digest(meta), len(meta))
        c.upload(path, config.digest, config.size, lambda _: None)
        manifest = d.dump({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST,
                           "artifactType": ARTIFACT_TYPE, "config": config.to_json(),
                           "layers": [layer.to_json()]})
        c.put_manifest(tag_of(key), d.OCI_MANIFEST, manifest)
    finally:
        c.session.close()


def _entry(fleet: Fleet, key: str) -> tuple[d.Descriptor, bytes]:
    c = fleet.client()
    try:
        _, raw = c.get_manifest(tag_of(key), "entry")
        m = json.loads(raw)
        config = d.Descriptor.from_json(m["config"])
        return d.Descriptor.from_json(m["layers"][0]), c.read_blob(config, "entry")
    finally:
        c.session.close()


def _keys(fleet: Fleet) -> list[str]:
    c = fleet.client()
    try:
        r = c.session.client.get(c.url("tags/list"))
        return sorted(t.removeprefix("layer-") for t in r.json()["tags"])
    finally:
        c.session.close()


@pytest.mark.parametrize("damage", ["planted", "corrupt", "missing-blob"])
def test_a_bad_entry_is_ignored_and_converted_afresh(fleet: Fleet, damage: str) -> None:
    by_digest = {}
    for key in _keys(fleet):
        layer, meta = _entry(fleet, key)
        by_digest[layer.digest] = (key, layer, meta)
    base1, _, app = _targets(fleet.filled)
    key, layer, meta = by_digest[base1]
    if damage == "planted":  # a valid eStargz blob of other content, under the real key
        _, other, other_meta = by_digest[app]
        raw = json.loads(other_meta)
        raw["key"] = key
        _plant(fleet, key, other, json.dumps(raw, sort_keys=True).encode())
    elif damage == "corrupt":
        _plant(fleet, key, layer, b"{not json")
    else:  # the entry names a blob the repository no longer holds
        saved = fleet.root / "saved-blob"
        c = fleet.client()
        try:
            with open(saved, "w+b") as f:
                c.download(layer, "saved", f)
            assert c.session.client.delete(c.url(f"blobs/{layer.digest}")).status_code == 202
        finally:
            c.session.close()
    try:
        proc = fleet.machine(f"C-{damage}").optimize(
            f"oci:{fleet.images['one']}:v1", f"docker://{fleet.reg.host}/app/c-{damage}:v1",
            "--cache-ref", fleet.ref())
        report, err = finished(proc)
        assert _layers(report)[0]["cache"] == "miss"
        assert f"entry {tag_of(key)} ignored" in err, err
        assert report["target"] == fleet.filled["target"]
    finally:  # the genuine entry back for the other tests
        if damage == "missing-blob":
            c = fleet.client()
            try:
                c.upload(saved, layer.digest, layer.size, lambda _: None)
            finally:
                c.session.close()
        _plant(fleet, key, layer, meta)


def test_digest_only_trust_takes_a_planted_entry(fleet: Fleet) -> None:
    """The documented risk of --cache-ref-trust=digest-only: no content check, so an entry
    planted by whoever may push to the cache repository ends up in the image."""
    by_digest = {}
    for key in _keys(fleet):
        layer, meta = _entry(fleet, key)
        by_digest[layer.digest] = (key, layer, meta)
    base1, _, app = _targets(fleet.filled)
    key, layer, meta = by_digest[base1]
    _, other, other_meta = by_digest[app]
    raw = json.loads(other_meta)
    raw["key"] = key
    _plant(fleet, key, other, json.dumps(raw, sort_keys=True).encode())
    try:
        report, _ = finished(fleet.machine("E").optimize(
            f"oci:{fleet.images['one']}:v1", f"docker://{fleet.reg.host}/app/e:v1",
            "--cache-ref", fleet.ref(), "--cache-ref-trust", "digest-only"))
    finally:
        _plant(fleet, key, layer, meta)
    assert _layers(report)[0]["cache"] == "remote-hit"
    assert _targets(report)[0] == app != base1


def test_two_machines_filling_one_key_at_once_both_succeed(fleet: Fleet) -> None:
    ref = f"docker://{fleet.reg.host}/cache/race"
    procs = [fleet.machine(f"R{i}").optimize(
        f"oci:{fleet.images['three']}:v1", f"docker://{fleet.reg.host}/app/race{i}:v1",
        "--cache-ref", ref) for i in (1, 2)]
    reports = [finished(p)[0] for p in procs]
    assert reports[0]["target"] == reports[1]["target"]
    c = fleet.client("cache/race")
    try:
        tags = c.session.client.get(c.url("tags/list")).json()["tags"]
    finally:
        c.session.close()
    assert len(tags) == len(set(tags)) == 3, tags


def test_pull_only_credentials_read_and_never_write(fleet: Fleet) -> None:
    fresh = _image(fleet.root / "src" / "four", os.urandom(40_000))
    keys = _keys(fleet)
    before = len(fleet.reg.log())
    fleet.reg.issuer.read_only.add(CACHE)
    try:
        report, err = finished(fleet.machine("D").optimize(
            f"oci:{fresh}:v1", f"docker://{fleet.reg.host}/app/four:v1",
            "--cache-ref", fleet.ref()))
    finally:
        fleet.reg.issuer.read_only.discard(CACHE)
    log = fleet.reg.log()[before:]
    assert [lay["cache"] for lay in _layers(report)] == ["remote-hit", "remote-hit", "miss"]
    assert _keys(fleet) == keys
    assert not fleet.reg.blob_uploads(CACHE, log)
    assert f"/v2/{CACHE}/manifests/" not in "".join(
        line for line in log.splitlines() if '"PUT ' in line)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len([x for x in lines if "read-only" in x]) == 1, err
    assert not any("error" in x.lower() or "warning" in x.lower() for x in lines), err


def test_an_unreachable_cache_is_one_warning_never_a_failure(fleet: Fleet) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report, err = finished(fleet.machine("F").optimize(
        f"oci:{fleet.images['one']}:v1", f"docker://{fleet.reg.host}/app/f:v1",
        "--cache-ref", f"docker://127.0.0.1:{port}/cache"))
    assert report["target"] == fleet.filled["target"]
    warnings = [x for x in err.splitlines() if "WARNING" in x]
    assert len(warnings) == 1 and "cannot be used" in warnings[0], err
