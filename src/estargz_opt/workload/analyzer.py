"""Profile an image: run its workload in a sample container and record the files it used.

This ties the pieces together: the runner chosen for the image's store runs the
workload (`sample.run_sample`) and returns the container paths it touched, in
first-access order; the recorder (prioritize.record) maps each to the top-most layer
that holds it. Which names each layer holds is read from the layer blobs meanwhile, in a
background thread, so it costs no extra time on top of the `--period`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from estargz_opt import descriptor as d
from estargz_opt.descriptor import Descriptor, Manifest
from estargz_opt.format.source import Spool
from estargz_opt.prioritize.layerindex import LayerNames
from estargz_opt.prioritize.record import RecordEntry, Recorder
from estargz_opt.stores import Store, as_containerd, is_containerd
from estargz_opt.workload.options import SamplerOptions
from estargz_opt.workload.rootless.checks import is_real_root
from estargz_opt.workload.runc.runner import RuncRunner
from estargz_opt.workload.runner import Runner, SampleImage
from estargz_opt.workload.sample import SampleRequest, SampleResult, Tick, run_sample

log = logging.getLogger("estargz_opt")


@dataclass(slots=True)
class Analysis:
    """The record of one workload run, plus how the run went."""

    entries: list[RecordEntry]
    sample: SampleResult
    #: paths per layer digest, once the caller has matched the record to its manifest
    prioritized: dict[str, list[str]] = field(default_factory=dict)
    #: the platform this run was for ("linux/arm64"), when several ran
    platform: str = ""
    #: the runs of the further platforms (optimize --all-platforms); `entries` holds all
    others: list[Analysis] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        """How the run went, for JSON reports; several platforms: each run under
        "platforms" (the top-level figures are the first platform's run)."""
        out: dict[str, object] = {
            "endedBy": self.sample.ended_by,
            "exitStatus": self.sample.exit_status,
            "fileAccesses": len(self.sample.paths),
            "recordedFiles": len(self.entries),
            "queueOverflows": self.sample.overflows,
        }
        if self.others:
            runs = [self, *self.others]
            out["platforms"] = [
                {
                    "platform": run.platform,
                    "endedBy": run.sample.ended_by,
                    "exitStatus": run.sample.exit_status,
                    "fileAccesses": len(run.sample.paths),
                    "recordedFiles": run.recorded,
                }
                for run in runs
            ]
        return out

    @property
    def recorded(self) -> int:
        return len(self.entries) - sum(len(o.entries) for o in self.others)


def analyze(
    store: Store,
    image_name: str,
    manifest_desc: Descriptor,
    manifest: Manifest,
    opts: SamplerOptions,
    *,
    on_tick: Tick | None = None,
    output: BinaryIO | None = None,
    spool: Spool | None = None,
    cache_dir: Path | None = None,
) -> Analysis:
    """Run the workload of `manifest` (the host platform's) and record what it touched;
    with `spool`, the layers' tar bytes are kept there for the conversion that follows.
    `cache_dir` (--cache-dir) holds the runc runner's unpacked layers; None: none are
    kept (--no-cache)."""
    config = d.load_json(store.read(manifest.config, "image config"), "image config")
    layers = [x for x in manifest.layers if x.media_type in d.LAYER_TYPES]
    diff_ids = d.config_diff_ids(config, len(layers), image_name)
    image = SampleImage(image_name, config, layers, diff_ids)
    runner = runner_for(store, opts, cache_dir)
    req = SampleRequest(runner, image, opts, on_tick=on_tick, output=output)
    return record_workload(req, manifest_desc.digest, spool)


def runner_for(store: Store, opts: SamplerOptions, cache_dir: Path | None = None) -> Runner:
    """The runner `--runner` names. By default: the rootless runner for anyone but root
    (in the initial user namespace), whatever the source; for root, containerd's own for
    an image in containerd, and runc directly for any other store (a layout, an archive,
    a registry).

    `--runner containerd` needs the image in containerd; `--runner runc` and
    `--runner rootless` take an image from any store, containerd's included (its blobs
    are streamed from containerd).
    """
    default = "containerd" if is_containerd(store) else "runc"
    name = opts.runner or (default if is_real_root() else "rootless")
    if name == "rootless":
        from estargz_opt.workload.rootless.runner import RootlessRunner

        return RootlessRunner(store, opts, opts.runtime)
    if name == "containerd":
        # imported here: grpc and containerd's client take ~0.15 s to load, for nothing
        # when the runc or rootless runner runs an image from a layout, archive or registry
        from estargz_opt.workload.containerd.runner import ContainerdRunner

        return ContainerdRunner(as_containerd(store, "the containerd runner"), opts.runtime)
    return RuncRunner(store, opts.runtime, layer_cache=cache_dir)


def record_workload(
    req: SampleRequest, manifest_digest: str, spool: Spool | None = None
) -> Analysis:
    """Run the workload as `req` says and map each accessed path to its layer."""
    with ThreadPoolExecutor(1, thread_name_prefix="layer-names") as pool:
        names_job = pool.submit(_layer_names, req.runner, req.image.layers, spool)
        sample = run_sample(req)
        names = names_job.result()
    recorder = Recorder(names, manifest_digest)
    for path in sample.paths:
        if path.startswith("/"):
            recorder.record(path)
    log.info(
        "recorded %d files: %s",
        len(recorder.entries),
        ", ".join(
            f"layer {i}: {n}"
            for i in range(len(req.image.layers))
            if (n := sum(1 for e in recorder.entries if e.layer_index == i))
        )
        or "none",
    )
    return Analysis(recorder.entries, sample)


def _layer_names(runner: Runner, layers: list[Descriptor], spool: Spool | None) -> LayerNames:
    return LayerNames([scan_layer(runner.layer_chunks(x), x.digest, spool) for x in layers])


def scan_layer(chunks: Iterable[bytes], digest: str, spool: Spool | None) -> frozenset[str]:
    """One layer's names, read while the workload runs; with `spool`, the layer is read
    to its end (past the tar's end marker), so that the spool keeps its whole tar."""
    if spool is None:
        return LayerNames.names_in_stream(chunks)
    pieces = spool.tee(digest, chunks, f"layer {digest}")
    # A bare iterator: the name scan stops at the tar's end marker and closes what it
    # reads from, which must not close (and discard) the spool's copy.
    names = LayerNames.names_in_stream(iter(pieces.__next__, None))
    for _ in pieces:
        pass
    return names
