#!/usr/bin/env python3
"""The converted-layer cache: a rebuilt image (only its app layer changed), in one run.

On the cached ~250 MB test image (bench/build_image.py) and a rebuild of it whose top
layer (/app/main.py) changed, all measured in the same run:
  (a) ctr-remote 0.14.3 ``image optimize --oci --no-optimize`` on the rebuilt image, in a
      private containerd (as bench/bench_layers.py runs it);
  (b) ``estargz-opt optimize --oci --no-optimize`` on the rebuilt image's OCI layout with
      an empty cache, and with ``--no-cache`` (today's cost: (b) must be no slower);
  (c) the same with the cache warmed by converting the first image (not timed).
  (d) registry -> registry: the rebuilt image pushed (by skopeo) to Debian's docker-registry
      on loopback, converted into another tag there once, then again with the warm cache
      and the target holding every blob: timed, with the registry's request log (through
      tests/support/throttle_proxy.py, unthrottled) showing that no blob was uploaded.
Targets: (c) at most 0.05x of (a); (b) no slower than --no-cache; (d) no layer converted
and no blob uploaded. (c) must also give the manifest digest of (b). A markdown table
goes to stdout, details to bench/results/<name>.json.

Usage: python3 bench/bench_cache.py [--name NAME] [--ctr-remote PATH] [--skip-reference]
Needs root (a private containerd; building the image the first time).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers
import benchlib
import build_image
from benchlib import RESULTS_DIR, log, run, run_measured

REBUILT_TAG = "rebuilt"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put(blobs: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def app_layer() -> tuple[bytes, str]:
    """A new top layer: /app/main.py changed (the app was rebuilt). (blob, DiffID)."""
    main = build_image.APP_MAIN + b"# rebuilt: version 2\n"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, build_image.EPOCH + 1
        tar.addfile(d)
        f = tarfile.TarInfo("app/main.py")
        f.size, f.mode, f.mtime = len(main), 0o644, build_image.EPOCH + 1
        tar.addfile(f, io.BytesIO(main))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, 6, mtime=0), f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"


def make_rebuilt(src_layout: Path, out: Path) -> None:
    """A copy of the layout (blobs hard-linked) whose image has its top layer replaced,
    tagged REBUILT_TAG."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem
            shutil.copy2(a, b)

    shutil.copytree(src_layout, out, copy_function=link)
    blobs = out / "blobs" / "sha256"
    index = json.loads((out / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    blob, diff_id = app_layer()
    layer = _put(blobs, blob)
    manifest["layers"][-1] = {"mediaType": build_image.MT_LAYER_GZIP, **layer}
    config["rootfs"]["diff_ids"][-1] = diff_id
    config["history"][-1]["created_by"] = "app rebuilt"
    manifest["config"] = {"mediaType": build_image.MT_CONFIG, **_put(blobs, _canonical(config))}
    man = _put(blobs, _canonical(manifest))
    new = {**desc, **man, "annotations": {"org.opencontainers.image.ref.name": REBUILT_TAG}}
    (out / "index.json").unlink()  # a hard link to the cached image's index: not rewritten
    (out / "index.json").write_bytes(_canonical({**index, "manifests": [new]}))


def ours(cli: list[str], src: str, out: Path, cache: list[str]) -> dict:
    cmd = [*cli, "optimize", "--oci", "--no-optimize", "--json", *cache, src, f"oci:{out}:out"]
    log(" ".join(cmd[1:]))
    m = run_measured(cmd).check()
    report = json.loads(m.stdout)
    res = {**m.as_dict(), "target": report["target"],
           "cache": [x["cache"] for x in report["layers"]]}
    log(f"  {m.wall_s:.2f} s wall, {m.cpu_s:.2f} s CPU, layers: {res['cache']}")
    shutil.rmtree(out)
    return res


def registry_rerun(cli: list[str], rebuilt: Path, work: Path, cache: Path,
                   stack: contextlib.ExitStack) -> dict:
    """(d): the rerun registry -> registry with a warm cache and a full target."""
    sys.path.insert(0, str(benchlib.REPO_ROOT / "tests"))
    from support import lazypull  # the tests' registry and request-logging proxy

    registry = lazypull.Registry.start(work)
    stack.callback(registry.stop)
    proxy = lazypull.Proxy.start(registry.host, work / "requests.jsonl")
    stack.callback(proxy.stop)
    src = f"docker://{proxy.host}/app:{REBUILT_TAG}"
    dst = f"docker://{proxy.host}/app:{REBUILT_TAG}-esgz"
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{rebuilt}:{REBUILT_TAG}", src])
    cmd = [*cli, "optimize", "--oci", "--no-optimize", "--json", "--cache-dir", str(cache),
           "--src-tls-verify=false", "--dest-tls-verify=false", src, dst]
    log("(d) " + " ".join(cmd[1:]) + " (once to fill the target, then timed)")
    first = run_measured(cmd).check()
    proxy.clear()
    m = run_measured(cmd).check()
    report = json.loads(m.stdout)
    uploads = [r for r in proxy.requests()
               if "/blobs/uploads/" in r["path"] and r["method"] in ("POST", "PATCH", "PUT")]
    res = {**m.as_dict(), "target": report["target"], "first_wall_s": first.wall_s,
           "cache": [x["cache"] for x in report["layers"]], "blob_uploads": len(uploads),
           "requests": len(proxy.requests())}
    log(f"  {m.wall_s:.2f} s wall, layers: {res['cache']}, blob uploads: {len(uploads)},"
        f" {res['requests']} requests")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=None, help="results name (default cache-<timestamp>)")
    ap.add_argument("--ctr-remote", default=None, help="ctr-remote binary (default: install)")
    ap.add_argument("--skip-reference", action="store_true", help="only run estargz-opt")
    args = ap.parse_args(argv)
    name = args.name or time.strftime("cache-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the reference needs a private containerd")
    image = build_image.ensure_image()
    log(build_image.summary(image))
    cli = bench_layers.our_cli()
    ctr_remote = None if args.skip_reference else bench_layers.find_ctr_remote(args.ctr_remote)
    layout = Path(image["oci_tar"]).with_name("oci")
    report: dict = {"name": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": {"cpus": os.cpu_count()},
                    "image": {k: image[k] for k in ("ref", "manifest_digest", "total_size")},
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(benchlib.temp_dir("eo-bench-cache-", "/var/tmp"))
        rebuilt = work / "rebuilt"
        make_rebuilt(layout, rebuilt)
        src_first, src_rebuilt = f"oci:{layout}:{build_image.IMAGE_TAG}", f"oci:{rebuilt}:rebuilt"
        if ctr_remote:
            sock, _pid = stack.enter_context(bench_layers.private_containerd())
            archive = work / "rebuilt.tar"
            run(["tar", "-C", rebuilt, "-cf", archive, "."])
            run(["ctr", "-a", sock, "images", "import", "--no-unpack", "--base-name",
                 image["base_name"], archive])
            src = f"{image['base_name']}:{REBUILT_TAG}"
            cmd = [ctr_remote, "-a", str(sock), "image", "optimize", "--oci", "--no-optimize",
                   src, f"{image['base_name']}:rebuilt-esgz"]
            log("(a) " + " ".join(cmd[1:]))
            m = run_measured(cmd).check()
            log(f"  {m.wall_s:.2f} s wall, {m.cpu_s:.2f} s CPU")
            report["a_ctr_remote"] = m.as_dict()
        log("(b) --no-cache, then a cold cache")
        report["b_no_cache"] = ours(cli, src_rebuilt, work / "out", ["--no-cache"])
        report["b_cold"] = ours(cli, src_rebuilt, work / "out",
                                ["--cache-dir", str(work / "cold")])
        log("(c) warming a cache with the first image (not timed), then the rebuilt image")
        ours(cli, src_first, work / "out", ["--cache-dir", str(work / "warm")])
        report["c_warm"] = ours(cli, src_rebuilt, work / "out",
                                ["--cache-dir", str(work / "warm")])
        report["d_registry_rerun"] = registry_rerun(cli, rebuilt, work, work / "warm", stack)
    targets = {report[k]["target"] for k in ("b_no_cache", "b_cold", "c_warm",
                                             "d_registry_rerun")}
    if len(targets) != 1:
        raise SystemExit(f"the runs made different images: {targets}")
    a = report.get("a_ctr_remote", {}).get("wall_s")
    rows = [("(a) ctr-remote 0.14.3, rebuilt image", a, "")]
    for key, label in (("b_no_cache", "estargz-opt --no-cache (today)"),
                       ("b_cold", "(b) estargz-opt, cold cache"),
                       ("c_warm", "(c) estargz-opt, cache warmed by the first image")):
        rows.append((label, report[key]["wall_s"], " ".join(report[key]["cache"])))
    d = report["d_registry_rerun"]
    rows.append(("(d) registry -> registry rerun, warm cache, full target", d["wall_s"],
                 " ".join(d["cache"]) + f"; {d['blob_uploads']} blob uploads"))
    lines = ["| run | wall s | x of (a) | layers |", "|---|---:|---:|---|"]
    for label, wall, layers in rows:
        ratio = f"{wall / a:.3f}" if a and wall is not None else "-"
        lines.append(f"| {label} | {wall:.2f} | {ratio} | {layers} |" if wall is not None
                     else f"| {label} | - | - | |")
    c, b = report["c_warm"]["wall_s"], report["b_cold"]["wall_s"]
    nc = report["b_no_cache"]["wall_s"]
    lines.append("")
    lines.append(f"target (c) <= 0.05x (a): {'met' if a and c <= 0.05 * a else 'NOT met'}"
                 f" ({c / a:.3f}x)" if a else "target (c) vs (a): no reference run")
    lines.append(f"target (b) no slower than --no-cache: {b:.2f} s vs {nc:.2f} s"
                 f" ({b / nc:.2f}x)")
    lines.append(f"target (d) nothing converted or uploaded: "
                 f"{'met' if set(d['cache']) == {'hit'} and not d['blob_uploads'] else 'NOT met'}")
    lines.append(f"load average at start: {report['loadavg_start']}; 2 cores shared with CI")
    table = "\n".join(lines)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({**report, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
