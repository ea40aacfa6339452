"""workload.cgroups: the host's cgroup layout, crun's wrapper, leftover sample cgroups."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from estargz_opt.workload import cgroups

pytestmark = pytest.mark.root


def test_layouts(tmp_path: Path) -> None:
    unified, hybrid, v1 = tmp_path / "unified", tmp_path / "hybrid", tmp_path / "v1"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu io memory\n")
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (v1 / "memory").mkdir(parents=True)
    assert cgroups.v2_controllers_in_hybrid(str(unified)) == []
    assert cgroups.v2_controllers_in_hybrid(str(hybrid)) == ["hugetlb"]
    assert cgroups.v2_controllers_in_hybrid(str(v1)) == []
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    assert cgroups.v2_controllers_in_hybrid(str(hybrid)) == []  # v2 only tracks processes


def test_crun_is_told_from_runc_by_what_it_says() -> None:
    assert cgroups.refuses_hybrid(shutil.which("crun") or "crun")
    assert not cgroups.refuses_hybrid(shutil.which("runc") or "runc")
    assert not cgroups.refuses_hybrid("/nonexistent/crun")


def test_wrapped_runtime_on_this_host(tmp_path: Path) -> None:
    crun, runc = shutil.which("crun"), shutil.which("runc")
    assert crun and runc
    assert cgroups.wrapped_runtime(runc, tmp_path / "w") == runc
    wrapped = cgroups.wrapped_runtime(crun, tmp_path / "w")
    if not cgroups.v2_controllers_in_hybrid():
        assert wrapped == crun
        return
    assert wrapped != crun and Path(wrapped).parent == tmp_path / "w"
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o700
    assert cgroups.wrapped_runtime(crun, tmp_path / "w") == wrapped  # written once
    assert [p.name for p in (tmp_path / "w").iterdir()] == [Path(wrapped).name]
    out = subprocess.run([wrapped, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("crun version")
    # what crun sees in there: no cgroup v2 hierarchy; the host keeps its own
    seen = subprocess.run([*cgroups.runtime_prefix(crun), "sh", "-c",
                           "grep -c ' - cgroup2 ' /proc/self/mountinfo || true"],
                          capture_output=True, text=True, check=True).stdout
    assert seen.strip() == "0"
    assert Path(cgroups.HYBRID_V2, "cgroup.controllers").exists()


def test_remove_cgroup(tmp_path: Path) -> None:
    v1, v2, other = tmp_path / "memory", tmp_path / "unified", tmp_path / "data"
    for d in (v1, v2, other):
        (d / "estargz-opt" / "sample-1").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"30 25 0:26 / {v1} rw,relatime shared:9 - cgroup cgroup rw,memory\n"
        f"31 25 0:27 / {v2} rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
        f"32 25 0:28 / {other} rw,relatime shared:11 - ext4 /dev/sda1 rw\n")
    cgroups.remove_cgroup("/estargz-opt/sample-1", str(mountinfo))
    assert not (v1 / "estargz-opt" / "sample-1").exists()
    assert not (v2 / "estargz-opt" / "sample-1").exists()
    assert (other / "estargz-opt" / "sample-1").exists()  # not a cgroup hierarchy
    assert (v1 / "estargz-opt").exists()  # the shared parent stays
    cgroups.remove_cgroup("/estargz-opt/sample-1", str(mountinfo))  # gone already: fine
    cgroups.remove_cgroup("", str(mountinfo))  # no cgroups path: nothing
    assert (v1 / "estargz-opt").exists()
