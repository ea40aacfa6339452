"""estargz-opt: make container images start fast under lazy pulling.

The public API is what `__all__` names; every submodule is internal and may change.

    import estargz_opt as eo

    result = eo.optimize(eo.OptimizeRequest.from_options(
        "docker://registry.example/app:1", "docker://registry.example/app:1-esgz",
        oci=True, sampler=eo.SamplerOptions(period=5, wait_on_line="ready")))
    print(result.digest)

Errors are the `EstargzOptError` tree (see estargz_opt.errors); progress goes to a
`ProgressListener` you pass, if any. The names load on first use, so that importing the
package stays cheap (the command line's Ctrl-C handler goes in before heavy imports).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from estargz_opt.check import ImageReport, LayerCheck, inspect, verify
    from estargz_opt.errors import (
        BadInputError,
        Cancelled,
        ContainerdError,
        EmptyProfileError,
        EstargzOptError,
        OptionsError,
        RegistryAccessError,
        RegistryError,
        SampleError,
        UsageError,
        VerificationError,
        WorkloadStartError,
    )
    from estargz_opt.events import ProgressListener
    from estargz_opt.format import Format, LayerOptions, LayerResult, ZstdFlavor
    from estargz_opt.layer import LayerConversion, convert_layer
    from estargz_opt.pipeline import analyze, optimize
    from estargz_opt.prioritize.profile import ProfileKind, ProfileSource
    from estargz_opt.report import OptimizeResult
    from estargz_opt.request import AnalyzeRequest, OptimizeRequest
    from estargz_opt.stores import StoreOptions
    from estargz_opt.stores.containerd.model import ContainerdOptions
    from estargz_opt.stores.registry.options import RegistryOptions
    from estargz_opt.workload.analyzer import Analysis
    from estargz_opt.workload.options import SamplerOptions

#: public name -> the module that defines it
_HOMES = {
    # the five operations
    "optimize": "estargz_opt.pipeline",
    "analyze": "estargz_opt.pipeline",
    "verify": "estargz_opt.check",
    "inspect": "estargz_opt.check",
    "convert_layer": "estargz_opt.layer",
    # their options and results
    "OptimizeRequest": "estargz_opt.request",
    "OptimizeResult": "estargz_opt.report",
    "AnalyzeRequest": "estargz_opt.request",
    "Analysis": "estargz_opt.workload.analyzer",
    "ImageReport": "estargz_opt.check",
    "LayerCheck": "estargz_opt.check",
    "LayerConversion": "estargz_opt.layer",
    "Format": "estargz_opt.format",
    "ZstdFlavor": "estargz_opt.format",
    "LayerOptions": "estargz_opt.format",
    "LayerResult": "estargz_opt.format",
    "ProfileKind": "estargz_opt.prioritize.profile",
    "ProfileSource": "estargz_opt.prioritize.profile",
    "SamplerOptions": "estargz_opt.workload.options",
    "StoreOptions": "estargz_opt.stores",
    "ContainerdOptions": "estargz_opt.stores.containerd.model",
    "RegistryOptions": "estargz_opt.stores.registry.options",
    "ProgressListener": "estargz_opt.events",
    # the error tree (the rest of it: estargz_opt.errors)
    "EstargzOptError": "estargz_opt.errors",
    "UsageError": "estargz_opt.errors",
    "OptionsError": "estargz_opt.errors",
    "BadInputError": "estargz_opt.errors",
    "VerificationError": "estargz_opt.errors",
    "EmptyProfileError": "estargz_opt.errors",
    "Cancelled": "estargz_opt.errors",
    "RegistryAccessError": "estargz_opt.errors",
    "RegistryError": "estargz_opt.errors",
    "ContainerdError": "estargz_opt.errors",
    "SampleError": "estargz_opt.errors",
    "WorkloadStartError": "estargz_opt.errors",
}

__all__ = [
    "Analysis",
    "AnalyzeRequest",
    "BadInputError",
    "Cancelled",
    "ContainerdError",
    "ContainerdOptions",
    "EmptyProfileError",
    "EstargzOptError",
    "Format",
    "ImageReport",
    "LayerCheck",
    "LayerConversion",
    "LayerOptions",
    "LayerResult",
    "OptimizeRequest",
    "OptimizeResult",
    "OptionsError",
    "ProfileKind",
    "ProfileSource",
    "ProgressListener",
    "RegistryAccessError",
    "RegistryError",
    "RegistryOptions",
    "SampleError",
    "SamplerOptions",
    "StoreOptions",
    "UsageError",
    "VerificationError",
    "WorkloadStartError",
    "ZstdFlavor",
    "analyze",
    "convert_layer",
    "inspect",
    "optimize",
    "verify",
]

try:
    __version__ = metadata.version("estargz-opt")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'estargz_opt' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
