"""What the image config says about the process: its command and its stop signal."""

from __future__ import annotations

import signal
from typing import Any

from estargz_opt.errors import BadInputError
from estargz_opt.workload.options import SamplerOptions, parse_json_array


def config_section(image_config: dict[str, Any]) -> dict[str, Any]:
    """Accept either the whole OCI image config document or its "config" object."""
    inner = image_config.get("config")
    if isinstance(inner, dict):
        return inner
    if "rootfs" in image_config or "architecture" in image_config:
        return {}  # a full document whose "config" is null
    return image_config


def parse_signal(text: str) -> int:
    """A signal given as "SIGTERM", "TERM", "15" or "SIGRTMIN+3" → its number."""
    s = text.strip()
    if s.isdigit():
        n = int(s)
        if 0 < n < signal.NSIG:
            return n
        raise BadInputError(f"invalid stop signal {text!r}")
    name = s.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    base, plus, off = name.partition("+")
    base2, minus, off2 = name.partition("-")
    try:
        if plus and base == "SIGRTMIN" and off.isdigit():
            n = signal.SIGRTMIN + int(off)
        elif minus and base2 == "SIGRTMAX" and off2.isdigit():
            n = signal.SIGRTMAX - int(off2)
        else:
            n = int(signal.Signals[name])
    except KeyError:
        raise BadInputError(f"invalid stop signal {text!r}") from None
    if not 0 < n < signal.NSIG:
        raise BadInputError(f"invalid stop signal {text!r}")
    return n


def stop_signal(image_config: dict[str, Any], default: str = "SIGKILL") -> int:
    """The signal that ends the sample container: the image's StopSignal, else `default`.

    ctr-remote uses `WithImageStopSignal(img, "SIGKILL")`, hence SIGKILL by default; pass
    default="SIGTERM" for containerd's usual default.
    """
    value = config_section(image_config).get("StopSignal") or ""
    return parse_signal(value or default)


def process_args(image_config: dict[str, Any], opts: SamplerOptions) -> list[str]:
    """(--entrypoint or Entrypoint) + (--args or Cmd). --entrypoint does not clear Cmd."""
    cfg = config_section(image_config)
    entrypoint = parse_json_array("entrypoint", opts.entrypoint)
    if entrypoint is None:
        entrypoint = list(cfg.get("Entrypoint") or [])
    cmd = parse_json_array("args", opts.args)
    if cmd is None:
        cmd = list(cfg.get("Cmd") or [])
    return entrypoint + cmd
