"""TLS for one registry host: the system roots, plus what its certs.d directory holds.

The directory is `--*-cert-dir` if given, else the first that exists of
`~/.config/containers/certs.d/HOST[:PORT]`, `/etc/containers/certs.d/HOST[:PORT]` and
`/etc/docker/certs.d/HOST[:PORT]` (containers/image's order). In it, `*.crt` are CA
roots and each `NAME.cert` + `NAME.key` pair is a client certificate. Verification off
(`--*-tls-verify=false`) still presents client certificates.

Go's TLS picks, among several pairs, one the server's CAs accept; Python's SSLContext
holds one, so every pair is checked but the first (by name) is the one presented.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from estargz_opt.errors import RegistryAccessError
from estargz_opt.stores.registry.options import RegistryOptions

#: Where a root user's certs.d directories are; tests cannot write here, so they use a
#: HOME or --*-cert-dir instead.
SYSTEM_CERTS_D = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The SSL context for a host and the facts an error message needs."""

    context: ssl.SSLContext
    #: the certs.d directory that was used, if any
    cert_dir: Path | None
    #: where a user should put the registry's CA (`NAME.crt`) or a client certificate
    suggested_dir: Path
    #: the client certificate (`NAME.cert`) presented, if any
    client_cert: Path | None = None


def certs_d_bases(opts: RegistryOptions) -> list[Path]:
    """The certs.d directories, in order; the per-user one only when HOME is known."""
    home = opts.env.get("HOME")
    user = [Path(home) / ".config" / "containers" / "certs.d"] if home else []
    return [*user, *SYSTEM_CERTS_D]


def find_cert_dir(host: str, opts: RegistryOptions) -> Path | None:
    if opts.cert_dir is not None:
        return opts.cert_dir
    for base in certs_d_bases(opts):
        if (base / host).is_dir():
            return base / host
    return None


def tls_config(host: str, opts: RegistryOptions) -> TlsConfig:
    """An SSLContext on the system roots (not certifi: an organisation's CA installed in
    the system store must work), with the host's certs.d contents added."""
    ctx = ssl.create_default_context()
    if not opts.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert_dir = find_cert_dir(host, opts)
    client_cert = _load_dir(ctx, cert_dir) if cert_dir is not None else None
    return TlsConfig(ctx, cert_dir, cert_dir or certs_d_bases(opts)[0] / host, client_cert)


def _load_dir(ctx: ssl.SSLContext, d: Path) -> Path | None:
    """Load `d`'s CAs and client pairs; the client certificate presented, if any."""
    pairs: list[tuple[Path, Path]] = []
    try:
        entries = sorted(d.iterdir())
    except FileNotFoundError:
        raise RegistryAccessError(f"certificate directory {d} does not exist") from None
    except OSError as e:
        raise RegistryAccessError(f"certificate directory {d}: {e.strerror}") from None
    for f in entries:
        try:
            if f.suffix == ".crt":
                ctx.load_verify_locations(cafile=f)
            elif f.suffix == ".cert":
                key = f.with_suffix(".key")
                if not key.exists():
                    raise RegistryAccessError(f"client certificate {f} has no key {key.name}")
                ctx.load_cert_chain(f, key)
                pairs.append((f, key))
            elif f.suffix == ".key" and not f.with_suffix(".cert").exists():
                raise RegistryAccessError(
                    f"client key {f} has no certificate {f.with_suffix('.cert').name}"
                )
        except ssl.SSLError as e:
            raise RegistryAccessError(
                f"{f}: not a usable PEM certificate or key ({e.reason or e})"
            ) from None
    if len(pairs) > 1:
        ctx.load_cert_chain(*pairs[0])  # each load replaced the one before
    return pairs[0][0] if pairs else None
