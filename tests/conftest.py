"""Shared fixtures (a private containerd, the reference ctr-remote, test layers) and the
layers of the suite a developer picks with -m (markers registered in pyproject.toml).

``unit``: in process or nearly, no root, no daemon, no network; what `make unit` runs. A
module or test says so itself, and collection fails if it also asks for a heavier layer.
``root`` (mounts, namespaces, another uid, apt), ``containerd`` (a private daemon),
``registry`` (registry servers), ``slow`` (fuzzing, bombs, killed runs): a fixture in
FIXTURE_LAYERS marks every test that uses it, directly or through another fixture; a
module or test marks itself for the rest. `make test` runs every layer.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytest.register_assert_rewrite("support")  # readable failures from shared checks

from support.containerd import (  # noqa: E402
    Containerd,
    Unavailable,
    containerd_unavailable_reason,
    ensure_ctr_remote,
)
from support.layers import (  # noqa: E402
    LayerBuildError,
    build_busybox_layer,
    build_synthetic_layer,
)
from support.reference import ParityReference  # noqa: E402

if TYPE_CHECKING:
    from estargz_opt.stores.containerd.client import Client

_RUN_DIR_KEY = pytest.StashKey[Path]()
_FAILED_KEY = pytest.StashKey[bool]()

#: the layers a fixture puts its users in
FIXTURE_LAYERS = {
    "containerd": ("containerd", "root"),
    "ctr_remote": ("containerd", "root"),  # drives a containerd; installed by apt as root
    "busybox_layer": ("root",),  # apt-get download into the machine's cache
}
HEAVY_LAYERS = ("root", "containerd", "registry", "slow")


def _skip(reason: str) -> None:
    # Printed as well, so the reason shows even where skip summaries are off.
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Everything the run writes goes under one directory of its own, removed at the end
    (kept only when a test failed, for a look at what it left): pytest's base temp (unless
    --basetemp names one, as .ci/run does), $TMPDIR for this process and every child (the
    CLI's spools, a killed run's leftovers), and the converted-layer cache, set before any
    fixture converts anything, so the machine's cache is never filled or read."""
    run = Path(tempfile.mkdtemp(prefix="estargz-opt-tests-"))
    run.chmod(0o755)  # tests that drop to another uid reach their own dirs under it
    config.stash[_RUN_DIR_KEY] = run
    if config.option.basetemp is None:
        config.option.basetemp = str(run / "pytest")
    tmp = run / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    cache = run / "layer-cache"
    cache.mkdir()
    os.environ["ESTARGZ_OPT_CACHE_DIR"] = str(cache)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_FAILED_KEY] = exitstatus not in (0, 5)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the layers its fixtures need; refuse a `unit` test that
    needs more (it would fail, or skip, where `make unit` runs)."""
    wrong = []
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            for layer in FIXTURE_LAYERS.get(name, ()):
                item.add_marker(layer)
        if item.get_closest_marker("interop"):
            item.add_marker("containerd")
            item.add_marker("root")
        heavy = [layer for layer in HEAVY_LAYERS if item.get_closest_marker(layer)]
        if heavy and item.get_closest_marker("unit"):
            wrong.append(f"{item.nodeid}: marked unit but needs {', '.join(heavy)}")
    if wrong:
        raise pytest.UsageError("\n".join(wrong))


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(_RUN_DIR_KEY, None)
    if run is None:
        return
    ours = config.option.basetemp == str(run / "pytest")
    if config.stash.get(_FAILED_KEY, False) and ours and (run / "pytest").is_dir():
        print(f"\ntest files kept for the failures: {run}", file=sys.stderr)
        return
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_layer_cache(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty converted-layer cache (its subprocesses inherit the
    variable), so no test fills the machine's cache or depends on what it holds."""
    path = tmp_path_factory.mktemp("layer-cache")
    monkeypatch.setenv("ESTARGZ_OPT_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory):
    """A private containerd for the whole session (root only).

    Yields a helpers_containerd.Containerd with .address, .root, .ctr() and
    .ingest(); the daemon is stopped and its directory removed afterwards.
    """
    reason = containerd_unavailable_reason()
    if reason:
        _skip(reason)
    # A short base keeps socket paths under the 107-byte unix limit.
    directory = tmp_path_factory.mktemp("ctrd", numbered=True)
    daemon = Containerd.start(directory)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def client(containerd: Containerd) -> Iterator[Client]:
    """A gRPC client of the session's containerd, default namespace, closed after the test."""
    from estargz_opt.stores.containerd.client import Client

    with Client(containerd.address, "default", timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def ctr_remote() -> Path:
    """Path of the reference ctr-remote 0.14.3 (installed if missing)."""
    try:
        return ensure_ctr_remote()
    except Unavailable as e:
        _skip(f"reference ctr-remote unavailable: {e}")
        raise  # not reached


@pytest.fixture(scope="session")
def parity_reference(ctr_remote: Path, containerd: Containerd, busybox_layer: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> ParityReference:
    """The parity image (busybox + two docker-style layers) in the session's containerd,
    with ctr-remote's optimize of it run once per format for every test comparing to it."""
    return ParityReference(ctr_remote, containerd, busybox_layer,
                           tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer tar built from Debian's busybox-static .deb (cached .deb)."""
    out = tmp_path_factory.mktemp("layers") / "busybox.tar"
    try:
        return build_busybox_layer(out)
    except LayerBuildError as e:
        _skip(str(e))
        raise  # not reached


@pytest.fixture(scope="session")
def synthetic_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic layer: 9 MiB file (3 chunks), links, xattr, long name, ..."""
    return build_synthetic_layer(tmp_path_factory.mktemp("layers") / "synthetic.tar")
