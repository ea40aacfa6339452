#!/usr/bin/env python3
"""Layer conversion: estargz-opt against the reference ctr-remote, side by side, in one run.

On the cached 3-layer Debian test image (bench/build_image.py):
  * reference: a private containerd, the image imported, then
    ``ctr-remote image optimize --oci --no-optimize [--zstdchunked] SRC DST``
    (the whole image, as ctr-remote converts it);
  * ours (``--ours``):
      - ``optimize`` (default): ``estargz-opt optimize --oci --no-optimize [--zstdchunked]``
        on the image's OCI layout, no daemon;
      - ``containerd``: ``estargz-opt -a SOCK optimize --oci --no-optimize [--zstdchunked]
        SRC DST`` on the image imported into the same private containerd ctr-remote uses;
      - ``layers``: ``estargz-opt layer convert LAYER OUT --format F`` per layer.
Each command is timed (wall, user+sys CPU, peak RSS from wait4() of the child), the
converted layers' compressed sizes are summed, and a markdown table is printed
(stdout) and written with all details to bench/results/<name>.json.

Usage: python3 bench/bench_layers.py [--ours optimize|containerd|layers]
       [--formats estargz,zstdchunked] [--repeat N] [--name NAME] [--ctr-remote PATH]
       [--wait-idle SECONDS] [--wait-cli SECONDS]
Needs root (private containerd; building the image the first time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import build_image
from benchlib import NO_CACHE, REPO_ROOT, RESULTS_DIR, Measurement, log, run, run_measured

SCRIPTS = REPO_ROOT / "scripts"

# format name of ours -> extra ctr-remote flags for the same format
CTR_REMOTE_FLAGS = {
    "estargz": [],
    "zstdchunked": ["--zstdchunked"],
}


# --------------------------------------------------------------------------- containerd


@contextlib.contextmanager
def private_containerd() -> Iterator[tuple[Path, int | None]]:
    """A private containerd (scripts/containerd-up.sh); always stopped and removed."""
    up, down = SCRIPTS / "containerd-up.sh", SCRIPTS / "containerd-down.sh"
    for s in (up, down):
        if not s.exists():
            raise SystemExit(f"{s} is missing")
    # Short path: unix socket paths are limited to 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="eo-bench-", dir="/tmp"))
    try:
        log(f"starting a private containerd in {state} ...")
        run(["bash", up, state])
        sock = state / "containerd.sock"
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((state / "containerd.pid").read_text().strip())
        yield sock, pid
    finally:
        log("stopping the private containerd ...")
        res = run(["bash", down, state], check=False)
        if res.returncode != 0:
            log(f"warning: containerd-down.sh failed: {res.stderr.strip()}")


def proc_cpu_s(pid: int | None) -> float | None:
    """user+sys CPU seconds consumed so far by a (non-child) process, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ctr_json(sock: Path, digest: str) -> dict:
    return json.loads(run(["ctr", "-a", sock, "content", "get", digest]).stdout)


def image_target(sock: Path, ref: str) -> tuple[str, str]:
    out = run(["ctr", "-a", sock, "images", "ls", f"name=={ref}"]).stdout
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == ref:
            return parts[1], parts[2]  # media type, digest
    raise RuntimeError(f"image {ref} not found after conversion:\n{out}")


def remove_image(sock: Path, ref: str, layers: list[dict]) -> None:
    """Delete ``ref`` and collect its content now (``--sync``), so the next run of either
    tool finds none of it: estargz-opt skips uploading a blob containerd already holds,
    and its output is deterministic, so without this a repeat would measure less work."""
    run(["ctr", "-a", sock, "images", "rm", "--sync", ref], check=False)
    left = set(run(["ctr", "-a", sock, "content", "ls", "-q"]).stdout.split())
    kept = [la["digest"] for la in layers if la["digest"] in left]
    if kept:
        raise RuntimeError(f"{ref}: converted layers still in containerd after"
                           f" `ctr images rm --sync`: {kept}")


def image_layers(sock: Path, ref: str, arch: str) -> list[dict]:
    """Layer descriptors of the image ``ref`` (through an index, if it is one)."""
    _mt, digest = image_target(sock, ref)
    doc = ctr_json(sock, digest)
    if "manifests" in doc:
        picks = [m for m in doc["manifests"]
                 if m.get("platform", {}).get("architecture", arch) == arch]
        if not picks:
            raise RuntimeError(f"{ref}: no {arch} manifest in its index")
        doc = ctr_json(sock, picks[0]["digest"])
    return doc["layers"]


# --------------------------------------------------------------------------- runs


def median_run(runs: list[dict]) -> dict:
    """The repetition with the median wall time (all of its figures come from it)."""
    walls = sorted(r["wall_s"] for r in runs)
    mid = walls[(len(walls) - 1) // 2]
    return next(r for r in runs if r["wall_s"] == mid)


def bench_ctr_remote(ctr_remote: str, sock: Path, daemon_pid: int | None, src: str, fmt: str,
                     arch: str, attempt: int) -> dict:
    dst = f"{build_image.IMAGE_BASE_NAME}:bench-{fmt}-{attempt}"
    cmd = [ctr_remote, "-a", str(sock), "image", "optimize", "--oci", "--no-optimize",
           *CTR_REMOTE_FLAGS[fmt], src, dst]
    log(f"ctr-remote {fmt} (#{attempt + 1}): {' '.join(cmd[1:])}")
    cpu0 = proc_cpu_s(daemon_pid)
    m = run_measured(cmd).check()
    cpu1 = proc_cpu_s(daemon_pid)
    layers = image_layers(sock, dst, arch)
    res = {
        **m.as_dict(),
        "daemon_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
        "layers": [{"digest": la["digest"], "size": la["size"], "mediaType": la["mediaType"],
                    "annotations": la.get("annotations", {})} for la in layers],
        "total_size": sum(la["size"] for la in layers),
    }
    log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, {m.maxrss_mib:.0f} MiB,"
        f" {res['total_size'] / 1e6:.1f} MB, containerd {res['daemon_cpu_s']} s CPU")
    remove_image(sock, dst, res["layers"])
    return res


def bench_ours_containerd(cli: list[str], sock: Path, daemon_pid: int | None, src: str,
                          fmt: str, arch: str, attempt: int) -> dict:
    """`estargz-opt -a SOCK optimize` on the imported image: ctr-remote's job, same daemon."""
    dst = f"{build_image.IMAGE_BASE_NAME}:ours-{fmt}-{attempt}"
    flags = ["--oci", "--no-optimize"] + (["--zstdchunked"] if fmt == "zstdchunked" else [])
    cmd = [*cli, "-a", str(sock), "optimize", *flags, *NO_CACHE, src, dst]
    log(f"estargz-opt {fmt} (#{attempt + 1}): {' '.join(cmd[1:])}")
    cpu0 = proc_cpu_s(daemon_pid)
    m = run_measured(cmd).check()
    cpu1 = proc_cpu_s(daemon_pid)
    digest = m.stdout.strip().splitlines()[-1]
    _mt, target = image_target(sock, dst)
    if target != digest:
        raise RuntimeError(f"{dst} points at {target}, estargz-opt printed {digest}")
    layers = image_layers(sock, dst, arch)
    res = {
        **m.as_dict(),
        "daemon_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
        "layers": [{"digest": la["digest"], "size": la["size"], "mediaType": la["mediaType"],
                    "annotations": la.get("annotations", {})} for la in layers],
        "total_size": sum(la["size"] for la in layers),
    }
    log(f"  {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, {m.maxrss_mib:.0f} MiB,"
        f" {res['total_size'] / 1e6:.1f} MB, containerd {res['daemon_cpu_s']} s CPU")
    remove_image(sock, dst, res["layers"])
    return res


def _bench_optimize(cli: list[str], oci_layout: str, out_dir: Path, fmt: str) -> dict:
    """`estargz-opt optimize` on the image's OCI layout: the same job ctr-remote does."""
    dst = out_dir / f"img-{fmt}"
    flags = ["--oci", "--no-optimize"] + (["--zstdchunked"] if fmt == "zstdchunked" else [])
    m = run_measured([*cli, "optimize", *flags, *NO_CACHE, f"oci:{oci_layout}:latest",
                      f"oci:{dst}:out"])
    m.check()
    digest = m.stdout.strip().splitlines()[-1]
    manifest = json.loads((dst / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())
    layers = [{"digest": la["digest"], "size": la["size"],
               "annotations": la.get("annotations", {})} for la in manifest["layers"]]
    shutil.rmtree(dst)
    res = {"wall_s": round(m.wall_s, 3), "user_s": round(m.user_s, 3), "sys_s": round(m.sys_s, 3),
           "cpu_s": round(m.cpu_s, 3), "maxrss_mib": round(m.maxrss_mib, 1), "layers": layers,
           "total_size": sum(la["size"] for la in layers)}
    log(f"  {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, {res['maxrss_mib']:.0f} MiB,"
        f" {res['total_size'] / 1e6:.1f} MB")
    return res


def bench_ours(cli: list[str], layer_paths: list[str], out_dir: Path, fmt: str,
               attempt: int, concurrent: bool = True, oci_layout: str | None = None) -> dict:
    """Convert every layer with our CLI: all at once (as an image conversion does, and as
    ctr-remote converts an image's layers) or, with concurrent=False, one after another."""
    per_layer: list[dict] = []
    ms: list[Measurement] = []
    mode = ("`optimize` on the OCI layout" if oci_layout
            else "concurrently" if concurrent else "one after another")
    log(f"estargz-opt {fmt} (#{attempt + 1}): layer convert x{len(layer_paths)}, {mode}")
    if oci_layout is not None:
        return _bench_optimize(cli, oci_layout, out_dir, fmt)
    if concurrent:
        driver = [sys.executable, Path(__file__).with_name("convert_concurrently.py")]
        m = run_measured([*driver, fmt, out_dir, *cli, "--", *layer_paths]).check()
        ms.append(m)
        infos = json.loads(m.stdout)
    else:
        infos = []
        for i, src in enumerate(layer_paths):
            out = out_dir / f"layer{i}.{fmt}"
            m = run_measured([*cli, "layer", "convert", src, out, "--format", fmt]).check()
            ms.append(m)
            infos.append(json.loads(m.stdout))
    for i, info in enumerate(infos):
        out = out_dir / f"layer{i}.{fmt}"
        actual = out.stat().st_size
        if info.get("size") != actual:
            raise RuntimeError(f"{out}: CLI reported size {info.get('size')}, file has {actual}")
        per_layer.append({"digest": info.get("digest"), "size": actual,
                          "uncompressedSize": info.get("uncompressedSize"),
                          "tocDigest": info.get("tocDigest"),
                          "annotations": info.get("annotations", {})}
                         | ({} if concurrent else ms[i].as_dict()))
        out.unlink()
    res = {
        "wall_s": round(sum(m.wall_s for m in ms), 3),
        "user_s": round(sum(m.user_s for m in ms), 3),
        "sys_s": round(sum(m.sys_s for m in ms), 3),
        "cpu_s": round(sum(m.cpu_s for m in ms), 3),
        "maxrss_mib": round(max(m.maxrss_mib for m in ms), 1),
        "layers": per_layer,
        "total_size": sum(la["size"] for la in per_layer),
    }
    log(f"  {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, {res['maxrss_mib']:.0f} MiB,"
        f" {res['total_size'] / 1e6:.1f} MB")
    return res


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.{digits}f}x"


def render(report: dict) -> str:
    rows = []
    for fmt, r in report["results"].items():
        ref, ours = r.get("ctr-remote"), r.get("estargz-opt")
        for tool, x in (("ctr-remote 0.14.3", ref), ("estargz-opt", ours)):
            if x is None:
                continue
            is_ours = x is ours
            rows.append([
                tool, fmt, f"{x['wall_s']:.1f}", f"{x['cpu_s']:.1f}", f"{x['maxrss_mib']:.0f}",
                f"{x['total_size'] / 1e6:.2f} MB",
                _ratio(ref and ref["wall_s"], x["wall_s"], 1) if is_ours else "1.0x",
                _ratio(x["total_size"], ref and ref["total_size"], 3) if is_ours else "1.000x",
            ])
    img = report["image"]
    head = (f"Layer conversion, {img['ref']}: {len(img['layers'])} layers,"
            f" {img['total_uncompressed_size'] / 1e6:.1f} MB tar,"
            f" {img['total_size'] / 1e6:.1f} MB gzip; {report['machine']['cpus']} CPUs;"
            f" median of {report['repeat']} run(s)")
    table = benchlib.markdown_table(
        ["tool", "format", "wall s", "CPU s", "peak RSS MiB", "compressed size",
         "speed (ctr-remote wall / this)", "size (this / ctr-remote)"], rows)
    notes = []
    for fmt, r in report["results"].items():
        for tool in ("ctr-remote", "estargz-opt"):
            x = r.get(tool)
            if x and x.get("daemon_cpu_s") is not None:
                notes.append(f"containerd daemon CPU during {tool} {fmt}:"
                             f" {x['daemon_cpu_s']:.1f} s (not in the CPU column)")
    load = report.get("loadavg_start", [0])[0]
    if load >= 1.0:
        notes.append(f"WARNING: the machine was busy (1-min load {load:.1f} at the start):"
                     " absolute times are inflated; the ratios are less affected (runs"
                     " interleave). Use --wait-idle to wait for a quiet machine.")
    if report.get("our_layers") == "optimize":
        ours = "`optimize --oci --no-optimize` on the image's OCI layout, no daemon"
    elif report.get("our_layers") == "containerd":
        ours = ("`-a SOCK optimize --oci --no-optimize` on the image in the same private"
                " containerd (read and written through its content API)")
    elif report.get("our_layers") == "one after another":
        ours = "`layer convert` per layer, one after another, CPU summed, RSS = max over layers"
    else:
        ours = ("one `layer convert` process per layer, all at once (as an image conversion"
                " converts layers in parallel); CPU and peak RSS of the whole process tree")
    notes.append(f"ctr-remote: whole image, `image optimize --oci --no-optimize`; estargz-opt: "
                 f"{ours}.")
    return "\n".join([head, "", table, "", *[f"- {n}" for n in notes]])


# --------------------------------------------------------------------------- main


def find_ctr_remote(explicit: str | None) -> str:
    if explicit:
        return explicit
    log("scripts/install-ctr-remote.sh ...")
    res = run(["bash", SCRIPTS / "install-ctr-remote.sh"])
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if not lines or not Path(lines[-1]).exists():
        raise SystemExit(f"install-ctr-remote.sh printed no binary path:\n{res.stdout}")
    return lines[-1].strip()


def our_cli() -> list[str]:
    # Prefer the entry point next to this interpreter: a pyenv shim in PATH would add a
    # bash + `pyenv exec` start-up to every measured call.
    local = Path(sys.executable).parent / "estargz-opt"
    return [str(local)] if local.exists() else benchlib.estargz_opt_cmd()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="estargz,zstdchunked",
                    help="comma-separated: estargz, zstdchunked (default: both)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and format (median)")
    ap.add_argument("--name", default=None, help="results name (default layers-<timestamp>)")
    ap.add_argument("--ctr-remote", default=None, help="ctr-remote binary (default: install)")
    ap.add_argument("--wait-cli", type=float, default=0,
                    help="seconds to wait for `estargz-opt layer convert` to exist")
    ap.add_argument("--skip-reference", action="store_true", help="only run estargz-opt")
    ap.add_argument("--ours", choices=("optimize", "containerd", "layers"), default="optimize",
                    help="optimize: `estargz-opt optimize` on the image's OCI layout (default);"
                    " containerd: `estargz-opt -a SOCK optimize` on the image imported into"
                    " the private containerd ctr-remote uses; layers: one `layer convert`"
                    " per layer")
    ap.add_argument("--sequential", action="store_true",
                    help="with --ours layers: convert layers one after another, not all at once")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="wait up to this many seconds for the 1-min load average to drop"
                    " below 0.5 before measuring (other jobs skew the timings)")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        if f not in CTR_REMOTE_FLAGS:
            ap.error(f"unknown format {f!r}")
    name = args.name or time.strftime("layers-%Y%m%d-%H%M%S")
    benchlib.install_signal_handlers()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the reference needs a private containerd")

    t_start = time.monotonic()
    image = build_image.ensure_image()
    if args.wait_idle:
        benchlib.wait_for("the machine to be idle (1-min load < 0.5)",
                          lambda: os.getloadavg()[0] < 0.5, args.wait_idle, every_s=10)
        t_start = time.monotonic()  # the wait is not part of the benchmark's own time
    log(build_image.summary(image))
    if not benchlib.wait_for("`estargz-opt layer convert`", benchlib.cli_layer_convert_ready,
                             args.wait_cli):
        raise SystemExit("`estargz-opt layer convert --help` does not work; "
                         "pip install -e '.[test]' first")
    cli = our_cli()
    ctr_remote = None if args.skip_reference else find_ctr_remote(args.ctr_remote)
    layer_paths = [la["path"] for la in image["layers"]]
    oci_layout = str(Path(image["oci_tar"]).with_name("oci"))

    report: dict = {
        "name": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "image": {k: image[k] for k in ("ref", "manifest_digest", "total_size",
                                        "total_uncompressed_size", "total_files")}
        | {"layers": [{k: la[k] for k in ("digest", "size", "uncompressedSize", "entries")}
                      for la in image["layers"]]},
        "commands": {"estargz-opt": {
            "optimize": [*cli, "optimize", "--oci", "--no-optimize", "[--zstdchunked]",
                         "oci:IMAGE:latest", "oci:OUT:out"],
            "containerd": [*cli, "-a", "SOCK", "optimize", "--oci", "--no-optimize",
                           "[--zstdchunked]", image["ref"], "DST"],
            "layers": [*cli, "layer", "convert", "SRC", "OUT", "--format", "F"],
        }[args.ours]},
        "results": {f: {} for f in formats},
    }
    if ctr_remote:
        report["reference"] = {
            "ctr_remote": ctr_remote,
            "version": run([ctr_remote, "--version"], check=False).stdout.strip(),
            "package": (Path(ctr_remote).parents[2] / "PACKAGE-VERSION").read_text().strip()
            if (Path(ctr_remote).parents[2] / "PACKAGE-VERSION").exists() else None,
        }
    git = run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], check=False)
    report["git_head"] = git.stdout.strip() or None

    report["our_layers"] = (args.ours if args.ours in ("optimize", "containerd")
                            else "one after another" if args.sequential else "concurrently")
    report["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        if ctr_remote or args.ours == "containerd":
            sock, daemon_pid = stack.enter_context(private_containerd())
            log("ctr images import (OCI layout tarball, --no-unpack) ...")
            imp = run_measured(["ctr", "-a", sock, "images", "import", "--no-unpack",
                                "--base-name", image["base_name"], image["oci_tar"]]).check()
            report["import_s"] = round(imp.wall_s, 2)
            image_target(sock, image["ref"])  # fail early if the import named it differently
        out_dir = stack.enter_context(benchlib.temp_dir("eo-bench-out-", "/var/tmp"))

        for fmt in formats:
            for attempt in range(args.repeat):
                if ctr_remote:
                    report["results"][fmt].setdefault("ctr-remote-runs", []).append(
                        bench_ctr_remote(ctr_remote, sock, daemon_pid, image["ref"], fmt,
                                         image["architecture"], attempt))
                if args.ours == "containerd":
                    ours = bench_ours_containerd(cli, sock, daemon_pid, image["ref"], fmt,
                                                 image["architecture"], attempt)
                else:
                    ours = bench_ours(cli, layer_paths, out_dir, fmt, attempt,
                                      concurrent=not args.sequential,
                                      oci_layout=oci_layout if args.ours == "optimize" else None)
                report["results"][fmt].setdefault("estargz-opt-runs", []).append(ours)
            for tool in ("ctr-remote", "estargz-opt"):
                runs = report["results"][fmt].get(f"{tool}-runs")
                if runs:
                    report["results"][fmt][tool] = median_run(runs)
            r = report["results"][fmt]
            if "ctr-remote" in r:
                r["speedup"] = round(r["ctr-remote"]["wall_s"] / r["estargz-opt"]["wall_s"], 2)
                r["size_ratio"] = round(r["estargz-opt"]["total_size"]
                                        / r["ctr-remote"]["total_size"], 4)
                r["wall_s_spread"] = {
                    t: [round(min(x["wall_s"] for x in r[f"{t}-runs"]), 2),
                        round(max(x["wall_s"] for x in r[f"{t}-runs"]), 2),
                        round(statistics.pstdev(x["wall_s"] for x in r[f"{t}-runs"]), 2)]
                    for t in ("ctr-remote", "estargz-opt")}

    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    text = render(report)
    report["table"] = text
    out = RESULTS_DIR / f"{name}.json"
    benchlib.write_json_atomic(out, report)
    print(text)
    print(f"\nresults: {out.relative_to(REPO_ROOT)} (benchmark took {report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        sys.exit(1)
