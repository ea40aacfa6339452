"""Image references as skopeo spells them, parsed in process: each transport, Docker Hub's
normalization, tags and digests, and a usage error (exit 2) naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from estargz_opt.errors import EstargzOptError, UsageError
from estargz_opt.reference import (
    ContainerdRef,
    DockerArchiveRef,
    OCIArchiveRef,
    OCIRef,
    RegistryRef,
    parse,
)

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "want"), [
    ("oci:/srv/layout:v1", OCIRef(Path("/srv/layout"), "v1")),
    ("oci:layout", OCIRef(Path("layout"), None)),
    ("oci-archive:/x/img.tar:v2", OCIArchiveRef(Path("/x/img.tar"), "v2")),
    ("oci-archive:/x/img.tar", OCIArchiveRef(Path("/x/img.tar"), None)),
    ("docker-archive:/x/s.tar", DockerArchiveRef(Path("/x/s.tar"), None)),
    ("docker-archive:/x/s.tar:app",
     DockerArchiveRef(Path("/x/s.tar"), "docker.io/library/app:latest")),
    ("docker-archive:/x/s.tar:@1", DockerArchiveRef(Path("/x/s.tar"), "@1")),
    ("docker.io/library/app:1.0", ContainerdRef("docker.io/library/app:1.0")),
    ("docker://localhost:5000/team/app:1.2",
     RegistryRef("localhost:5000", "team/app", "1.2")),
    ("docker://registry.example/app", RegistryRef("registry.example", "app", "latest")),
    ("docker://busybox", RegistryRef("docker.io", "library/busybox", "latest")),
    ("docker://user/app:edge", RegistryRef("docker.io", "user/app", "edge")),
    (f"docker://[::1]:5000/a/b@{DIGEST}", RegistryRef("[::1]:5000", "a/b", None, DIGEST)),
])
def test_each_transport(text: str, want: object) -> None:
    assert parse(text) == want


def test_docker_hub_is_reached_on_its_api_host() -> None:
    ref = RegistryRef.parse("docker://alpine:3")
    assert (ref.registry, ref.api_host, str(ref)) == (
        "docker.io", "registry-1.docker.io", "docker://docker.io/library/alpine:3")
    assert RegistryRef.parse("docker://localhost:5000/a").api_host == "localhost:5000"


@pytest.mark.parametrize(("text", "words"), [
    ("docker://localhost:5000/App:1", "repository component 'App'"),
    ("docker://localhost:5000/a:bad tag", "'bad tag' is not a valid tag"),
    ("docker://localhost:5000/a@sha256:123", "is not a sha256 digest"),
    (f"docker://localhost:5000/a:1@{DIGEST}", "a tag and a digest together"),
    ("docker://localhost:5000/", "no repository"),
    ("ftp://example/x", "unknown transport 'ftp://'"),
    ("oci-archive:", "no archive path"),
    ("docker-archive:/x/s.tar:@one", "@N needs an image number"),
    (f"docker-archive:/x/s.tar:app@{DIGEST}", "archives name images by tag"),
])
def test_bad_references_are_usage_errors_naming_the_reference(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    message = str(err.value)
    assert words in message and repr(text) in message and "\n" not in message
    assert err.value.exit_code == 2


@pytest.mark.parametrize("text", ["", "has space", "oci:"])
def test_not_a_reference_at_all(text: str) -> None:
    with pytest.raises(EstargzOptError, match="invalid image reference"):
        parse(text)


def test_with_tag_keeps_the_place() -> None:
    assert parse("oci:/l:v1").with_tag("v2") == OCIRef(Path("/l"), "v2")
    assert parse(f"docker://h.example/a@{DIGEST}").with_tag("t") == RegistryRef(
        "h.example", "a", "t")
