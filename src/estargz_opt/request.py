"""What `optimize` and `analyze` are asked to do: the requests, their defaults that
depend on other options, and every rule of how the options combine (OptionsError, which
names the fields and values; the command line spells them as its flags)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from estargz_opt import reference
from estargz_opt.cache import default_dir as default_cache_dir
from estargz_opt.cache.remote import Trust
from estargz_opt.constants import DEFAULT_CACHE_MAX_SIZE, DEFAULT_CHUNK_SIZE
from estargz_opt.errors import OptionsError, UsageError
from estargz_opt.format import Format, LayerOptions, ZstdFlavor
from estargz_opt.platforms import parse as parse_platform
from estargz_opt.prioritize.profile import ProfileKind, ProfileSource
from estargz_opt.stores import StoreOptions
from estargz_opt.workload.options import SamplerOptions


@dataclass(frozen=True, slots=True)
class OptimizeRequest:
    """What `optimize` converts, and how. Build one with `from_options`: it fills the
    defaults that depend on other options and checks how the options combine."""

    src: str
    dst: str
    layer: LayerOptions = field(default_factory=LayerOptions)
    #: convert Docker media types to OCI ones (needed for the annotations)
    oci: bool = False
    #: keep layers that are already sound eStargz and get no prioritized files
    reuse: bool = False
    #: platforms to convert ("linux/arm64"); none: the host's
    platforms: tuple[str, ...] = ()
    all_platforms: bool = False
    #: convert without prioritized files (no workload run, no record)
    no_optimize: bool = False
    #: records and prefetch lists, merged in this order
    profiles: tuple[ProfileSource, ...] = ()
    #: a profile that prioritizes nothing is a warning instead of an error
    allow_empty_profile: bool = False
    #: the platform ("linux/amd64") whose record lines other platforms take, by path
    profile_platform: str | None = None
    #: run the workload with these options (any source); see workload.options
    sampler: SamplerOptions | None = None
    #: write the record of the workload run here (ctr-remote's --record-out)
    record_out: Path | None = None
    #: also write the workload run's (or the profiles') files as a prefetch list here
    prefetch_list_out: Path | None = None
    #: how to reach the source's and the destination's stores
    src_store: StoreOptions = field(default_factory=StoreOptions)
    dst_store: StoreOptions = field(default_factory=StoreOptions)
    #: the converted-layer cache (estargz_opt.cache); None: no cache
    cache_dir: Path | None = None
    cache_max_size: int = DEFAULT_CACHE_MAX_SIZE
    #: leave BuildKit's attestation manifests out (else they follow the converted manifests)
    drop_attestations: bool = False
    #: the converted image's `subject` is the source (its bytes change: optional)
    with_referrer: bool = False
    #: attach an in-toto statement of the conversion to the converted image (attest.py)
    attest: bool = False
    #: a remote layer cache in a registry repository, docker://HOST/REPO (cache.remote),
    #: reached with the destination's registry options
    cache_ref: str | None = None
    cache_ref_trust: Trust = Trust.FULL

    @classmethod
    def from_options(
        cls,
        src: str,
        dst: str,
        *,
        format: Format | str = Format.ESTARGZ,
        zstd_flavor: ZstdFlavor | str = ZstdFlavor.STARGZ,
        compression_level: int | None = None,
        chunk_size: int = 0,
        min_chunk_size: int = 0,
        workers: int | None = None,
        oci: bool = False,
        reuse: bool = False,
        platforms: Sequence[str] = (),
        all_platforms: bool = False,
        no_optimize: bool = False,
        profiles: Sequence[ProfileSource] = (),
        allow_empty_profile: bool = False,
        profile_platform: str | None = None,
        sampler: SamplerOptions | None = None,
        record_out: Path | None = None,
        prefetch_list_out: Path | None = None,
        src_store: StoreOptions | None = None,
        dst_store: StoreOptions | None = None,
        cache: bool = True,
        cache_dir: Path | None = None,
        cache_max_size: int = DEFAULT_CACHE_MAX_SIZE,
        drop_attestations: bool = False,
        with_referrer: bool = False,
        attest: bool = False,
        cache_ref: str | None = None,
        cache_ref_trust: Trust | str = Trust.FULL,
    ) -> OptimizeRequest:
        """A checked request, with every default that depends on other options filled in.

        The fields are those of the same names, except: compression_level None is the
        format's (and zstd flavour's) default; chunk_size 0 is DEFAULT_CHUNK_SIZE;
        min_chunk_size is dropped for zstdchunked (upstream ignores it there); records
        among `profiles` are dropped under no_optimize (as ctr-remote ignores its
        --record-in then) while prefetch lists are refused; `cache` with no cache_dir uses
        the default cache directory (estargz_opt.cache.default_dir). OptionsError if
        options contradict.
        """
        fmt = Format(format)
        layer = LayerOptions(
            format=fmt,
            compression_level=compression_level,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            min_chunk_size=0 if fmt is Format.ZSTDCHUNKED else min_chunk_size,
            workers=workers,
            zstd_flavor=ZstdFlavor(zstd_flavor),
        )
        if no_optimize:
            profiles = [p for p in profiles if p.kind is not ProfileKind.RECORD]
        req = cls(
            src=src,
            dst=dst,
            layer=layer,
            oci=oci,
            reuse=reuse,
            platforms=tuple(platforms),
            all_platforms=all_platforms,
            no_optimize=no_optimize,
            profiles=tuple(profiles),
            allow_empty_profile=allow_empty_profile,
            profile_platform=profile_platform,
            sampler=sampler,
            record_out=record_out,
            prefetch_list_out=prefetch_list_out,
            src_store=src_store or StoreOptions(),
            dst_store=dst_store or StoreOptions(),
            cache_dir=(cache_dir or default_cache_dir()) if cache else None,
            cache_max_size=cache_max_size,
            drop_attestations=drop_attestations,
            with_referrer=with_referrer,
            attest=attest,
            cache_ref=cache_ref or None,
            cache_ref_trust=Trust(cache_ref_trust),
        )
        req.validate()
        return req

    @property
    def runs_workload(self) -> bool:
        return not (self.no_optimize or self.profiles)

    def validate(self) -> None:
        """Every check of how the options combine, as OptionsError (a UsageError)."""
        src, dst = reference.parse(self.src), reference.parse(self.dst)
        fmt = self.layer.format
        if self.layer.zstd_flavor is not ZstdFlavor.STARGZ and fmt is not Format.ZSTDCHUNKED:
            raise OptionsError(
                "{flavor} needs {fmt}", flavor="zstd_flavor", fmt="format=zstdchunked"
            )
        self.layer.validate()
        if fmt is Format.ZSTDCHUNKED and not self.oci:
            raise OptionsError("{fmt} requires {oci}", fmt="format=zstdchunked", oci="oci=True")
        if fmt is Format.EXTERNAL_TOC and self.reuse:
            raise OptionsError(
                "{fmt} cannot be combined with {reuse}",
                fmt="format=estargz-external-toc",
                reuse="reuse=True",
            )
        if self.no_optimize and any(p.kind is ProfileKind.PREFETCH_LIST for p in self.profiles):
            raise OptionsError(
                "{plist} cannot be combined with {no_opt}", plist=_PLIST, no_opt=_NO_OPTIMIZE
            )
        if isinstance(dst, reference.DockerArchiveRef):
            raise UsageError(
                f"{dst}: docker-archive: images are read only; write oci-archive:PATH[:TAG] "
                "or oci:DIR[:TAG]"
            )
        if self.runs_workload and self.sampler is not None:
            check_runner(src, self.sampler)
        if isinstance(dst, reference.RegistryRef) and dst.digest:
            raise UsageError(f"the destination {dst} names a digest; give it a tag instead")
        if self.record_out and not self.runs_workload:
            raise OptionsError(
                "{out} records a workload run; it cannot be combined with {rec}, {plist} "
                "or {no_opt}",
                out="record_out",
                rec=_RECORD,
                plist=_PLIST,
                no_opt=_NO_OPTIMIZE,
            )
        if self.prefetch_list_out and not (self.runs_workload or self.profiles):
            raise OptionsError(
                "{out} writes the files of a workload run or of the profiles; {no_opt} has neither",
                out="prefetch_list_out",
                no_opt=_NO_OPTIMIZE,
            )
        if self.profile_platform is not None and not any(
            p.kind is ProfileKind.RECORD for p in self.profiles
        ):
            raise OptionsError("{pp} applies to {rec}", pp="profile_platform", rec=_RECORD)
        if self.profile_platform is not None:
            parse_platform(self.profile_platform)  # a bad spelling fails before any work
        foreign_runs = self.runs_workload and (self.platforms or self.all_platforms)
        if self.allow_empty_profile and not (self.profiles or foreign_runs):
            raise OptionsError(
                "{allow} applies to {rec}, {plist}, and to {platforms} or {all} "
                "(a platform that cannot run here)",
                allow="allow_empty_profile=True",
                rec=_RECORD,
                plist=_PLIST,
                platforms="platforms",
                all="all_platforms",
            )
        if self.cache_max_size < 0:
            raise OptionsError(
                "{size} must not be negative, got " + str(self.cache_max_size),
                size="cache_max_size",
            )
        if not (dst.tag or src.tag):
            raise UsageError(f"name the destination tag: {dst} needs oci:DIR:TAG")
        if self.cache_ref is not None:
            ref = reference.parse(self.cache_ref)
            if not isinstance(ref, reference.RegistryRef) or ref.digest:
                raise OptionsError(
                    "{ref} names a registry repository, docker://HOST/REPO, got "
                    + repr(self.cache_ref),
                    ref="cache_ref",
                )


#: how errors name the option terms (a front end spells them its own way: OptionsError)
_RECORD = f"profiles={ProfileKind.RECORD.value}"
_PLIST = f"profiles={ProfileKind.PREFETCH_LIST.value}"
_NO_OPTIMIZE = "no_optimize=True"


@dataclass(frozen=True, slots=True)
class AnalyzeRequest:
    """What `analyze` runs: the image's workload, recorded into `record_out`. Build one
    with `from_options` for the default cache directory."""

    src: str
    record_out: Path
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    store: StoreOptions = field(default_factory=StoreOptions)
    #: also write the recorded files as a prefetch list here
    prefetch_list_out: Path | None = None
    #: where the runc runner keeps unpacked layers between runs; None: this run only
    cache_dir: Path | None = None

    @classmethod
    def from_options(
        cls,
        src: str,
        record_out: Path,
        *,
        sampler: SamplerOptions | None = None,
        store: StoreOptions | None = None,
        prefetch_list_out: Path | None = None,
        cache: bool = True,
        cache_dir: Path | None = None,
    ) -> AnalyzeRequest:
        """A request whose `cache` with no cache_dir uses the default cache directory
        (estargz_opt.cache.default_dir), as OptimizeRequest.from_options does."""
        return cls(
            src,
            record_out,
            sampler or SamplerOptions(),
            store or StoreOptions(),
            prefetch_list_out,
            (cache_dir or default_cache_dir()) if cache else None,
        )


def check_runner(src: reference.ImageRef, sampler: SamplerOptions) -> None:
    """The containerd runner runs only images in containerd (OptionsError otherwise)."""
    if sampler.runner == "containerd" and not isinstance(src, reference.ContainerdRef):
        raise OptionsError(
            "{containerd} runs images in containerd, and "
            + str(src).replace("{", "{{")
            + " is not one; drop {runner} (the runc runner runs it) or import the image "
            "into containerd",
            containerd="runner=containerd",
            runner="runner",
        )
