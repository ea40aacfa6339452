"""What the workload and prioritize modules may import, checked in a fresh interpreter.

The monitor helper runs privileged: it must not load grpc or any generated protobuf
module (nor a store). The spec steps and prioritization need no containerd either, so a
runner without containerd can share them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

FORBIDDEN = ("grpc", "google.protobuf")


def loaded_by(module: str) -> list[str]:
    code = f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "module",
    [
        "estargz_opt.workload.monitor",
        "estargz_opt.workload.spec",
        "estargz_opt.workload.runner",
        "estargz_opt.workload.stdio",
        "estargz_opt.workload.sample",
        "estargz_opt.workload.unpack",
        "estargz_opt.workload.runc.runner",
        "estargz_opt.workload.rootless.runner",
        "estargz_opt.workload.rootless.monitor",
        # picks the runner: containerd's (and grpc) only when it is the one that runs
        "estargz_opt.workload.analyzer",
        "estargz_opt.prioritize.record",
        "estargz_opt.prioritize.prefetch",
    ],
)
def test_no_grpc(module: str) -> None:
    loaded = loaded_by(module)
    assert module in loaded
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert bad == []


@pytest.mark.parametrize(
    "module", ["estargz_opt.workload.monitor", "estargz_opt.prioritize.prefetch"]
)
def test_no_store_at_all(module: str) -> None:
    assert [m for m in loaded_by(module) if m.startswith("estargz_opt.stores")] == []


def test_the_containerd_runner_does_load_grpc() -> None:
    # The check above would pass vacuously if sys.modules never showed grpc.
    loaded = loaded_by("estargz_opt.workload.containerd.runner")
    assert "grpc" in loaded and "estargz_opt.stores.containerd.client" in loaded
