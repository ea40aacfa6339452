"""The sampler flags of `ctr-remote image optimize` and the parsing of their values.

Every runner takes the same `SamplerOptions`; the spec steps, the stdio, the network and
the end conditions all read it. Parsing a value and checking it are one function, so
`validate()` refuses at once what a spec step would refuse later.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any

from estargz_opt import jsonlimits
from estargz_opt.errors import BadInputError, literal

DEFAULT_PERIOD = 10
#: --runner values; "" (the default) picks by where the image is and who we are (see
#: analyzer.runner_for)
RUNNERS: tuple[str, ...] = ("containerd", "runc", "rootless")
#: --runtime's default: the OCI runtime every runner runs (containerd's through its shim)
DEFAULT_RUNTIME = "runc"
#: --dns-nameservers' default (ctr-remote's)
DEFAULT_NAMESERVERS = "8.8.8.8"


@dataclass(slots=True)
class SamplerOptions:
    """Every sampler flag of `ctr-remote image optimize`, with upstream's defaults.

    Strings that upstream treats as "not given" when empty are kept as "" here too.
    """

    terminal: bool = False  # -t/--terminal; needs stdin
    stdin: bool = False  # -i
    period: int = DEFAULT_PERIOD  # seconds; <= 0 means the default
    user: str = ""  # user[:group], names or numbers
    cwd: str = ""
    args: str = ""  # JSON array; replaces the image Cmd
    entrypoint: str = ""  # JSON array; replaces the image Entrypoint (Cmd is kept)
    env: list[str] = field(default_factory=list)  # K=V, added or overridden
    env_file: str = ""  # one K=V per line
    mounts: list[str] = field(default_factory=list)  # type=…,source=…,destination=…,options=a:b
    dns_nameservers: str = DEFAULT_NAMESERVERS  # CSV
    dns_search_domains: str = ""  # CSV
    dns_options: str = ""  # CSV
    add_hosts: str = ""  # CSV of host:IP
    cni: bool = False
    cni_plugin_conf_dir: str = ""
    cni_plugin_dir: str = ""
    gpus: str = ""  # "all" or "0,1"
    net_host: bool = False
    wait_on_line: str = ""
    wait_on_signal: bool = False
    #: how the sample container runs (not ctr-remote flags): --runner and --runtime
    runner: str = ""
    runtime: str = DEFAULT_RUNTIME  # runc, crun or a path

    @property
    def effective_period(self) -> int:
        """The monitoring time in seconds: `period`, or the default when it is <= 0."""
        return self.period if self.period > 0 else DEFAULT_PERIOD

    def validate(self) -> None:
        """Reject option combinations and values upstream refuses, with one clear line."""
        if self.terminal and not self.stdin:
            raise BadInputError.with_terms(
                "{terminal} requires {stdin}", terminal="terminal", stdin="stdin"
            )
        if self.runner and self.runner not in RUNNERS:
            raise BadInputError.with_terms(
                "{runner} must be one of " + literal(f"{', '.join(RUNNERS)}, got {self.runner!r}"),
                runner="runner",
            )
        if not self.runtime:
            raise BadInputError.with_terms(
                "{runtime} must name an OCI runtime (runc, crun or a path)", runtime="runtime"
            )
        if self.wait_on_signal and self.terminal:
            raise BadInputError.with_terms(
                "{signal} cannot be used with {terminal}",
                signal="wait_on_signal",
                terminal="terminal",
            )
        parse_json_array("args", self.args)
        parse_json_array("entrypoint", self.entrypoint)
        for m in self.mounts:
            parse_mount(m)
        parse_add_hosts(self.add_hosts)
        parse_gpus(self.gpus)
        if self.cwd and not self.cwd.startswith("/"):
            raise BadInputError.with_terms(
                "{cwd} " + literal(repr(self.cwd)) + " must be an absolute path", cwd="cwd"
            )
        for e in self.env:
            check_env_entry("env", e)


def parse_json_array(field: str, text: str) -> list[str] | None:
    """Parse the JSON array of the option `field`; None when it was not given ("")."""
    if text == "":
        return None
    try:
        value = jsonlimits.loads(text, field)
    except BadInputError as e:
        raise BadInputError.with_terms(
            "{field} must be a JSON array of strings " + literal(f"({e})"), field=field
        ) from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInputError.with_terms(
            "{field} must be a JSON array of strings, got " + literal(repr(text)), field=field
        )
    return value


def csv_items(text: str) -> list[str]:
    """The non-empty items of a comma-separated flag value."""
    return [item for item in text.split(",") if item != ""]


def parse_mount(text: str) -> dict[str, Any]:
    """Parse one `--mount` value into an OCI spec mount.

    The value is a CSV of `key=val` fields; keys are type, source|src, destination|dst
    and options (colon-separated). Each field must contain exactly one '='.
    """
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as e:
        raise BadInputError(f"invalid --mount {text!r}: {e}") from None
    fields = rows[0] if rows else []
    mount: dict[str, Any] = {}
    for f in fields:
        if f.count("=") != 1:
            raise BadInputError(f"invalid --mount {text!r}: field {f!r} is not key=val")
        key, val = f.split("=")
        if key == "type":
            mount["type"] = val
        elif key in ("source", "src"):
            mount["source"] = val
        elif key in ("destination", "dst"):
            mount["destination"] = val
        elif key == "options":
            mount["options"] = val.split(":")
        else:
            raise BadInputError(f"invalid --mount {text!r}: key {key!r} is not supported")
    dst = mount.get("destination", "")
    if not dst:
        raise BadInputError(f"invalid --mount {text!r}: destination is missing")
    if not dst.startswith("/"):
        raise BadInputError(f"invalid --mount {text!r}: destination must be absolute")
    out: dict[str, Any] = {"destination": dst}
    for k in ("type", "source", "options"):
        if mount.get(k):
            out[k] = mount[k]
    return out


def parse_add_hosts(text: str) -> list[tuple[str, str]]:
    """`--add-hosts` CSV of host:IP → [(host, ip)]. The IP may itself contain ':'."""
    out = []
    for item in csv_items(text):
        host, sep, ip = item.partition(":")
        if not sep or not host or not ip:
            raise BadInputError(f"invalid --add-hosts entry {item!r}: expected host:IP")
        out.append((host, ip))
    return out


def parse_gpus(text: str) -> list[str]:
    """`--gpus` → CDI device names: "all" or comma-separated indices."""
    if text == "":
        return []
    if text == "all":
        return ["nvidia.com/gpu=all"]
    out = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise BadInputError(f"invalid --gpus {text!r}: expected 'all' or indices like 0,1")
        out.append(f"nvidia.com/gpu={int(item)}")
    return out


def check_env_entry(field: str, entry: str) -> None:
    """A `K=V` (or bare `K`) entry of env or env_file needs a name."""
    if entry.startswith("="):
        raise BadInputError.with_terms(
            "invalid {field} entry " + literal(repr(entry)) + ": the variable name is empty",
            field=field,
        )
