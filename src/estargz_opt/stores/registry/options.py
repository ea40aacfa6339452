"""What the command line says about reaching registries on one side of a run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Defaults (limits.py enforces them): no request but a blob transfer needs a minute
#: from a working registry, and at 256 KiB/s a 2 GiB layer may take 2h20 (a 100 Mbit/s
#: link moves it in 3 min), while a server trickling a byte a second fails in a minute.
DEFAULT_TIMEOUT = 60.0
DEFAULT_MIN_RATE = 256 << 10


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """How to reach the registry of a source or a destination (skopeo's per-side flags).

    `env` is the environment the credential lookup reads (REGISTRY_AUTH_FILE,
    XDG_RUNTIME_DIR, HOME, DOCKER_CONFIG, PATH for credential helpers); it is passed in,
    never read from os.environ below the CLI, so that tests and callers control it.
    """

    #: --authfile (else REGISTRY_AUTH_FILE, then the usual auth files)
    authfile: Path | None = None
    #: --src-creds / --dest-creds USER[:PASS]; overrides every auth file
    creds: str | None = field(default=None, repr=False)
    #: where `creds` came from, as errors about them name it (the command line says which
    #: of its flags, so that an error names exactly what the user typed)
    creds_source: str = "the creds option"
    #: --src-no-creds: access the registry anonymously
    no_creds: bool = False
    #: --src-tls-verify / --dest-tls-verify; false also allows plain HTTP
    tls_verify: bool = True
    #: --src-cert-dir / --dest-cert-dir: a certs.d-style directory used instead of the
    #: per-host ones
    cert_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    #: --registry-timeout: seconds any one request may take (headers and body), beyond
    #: the time its bytes need at `min_rate`
    timeout: float = DEFAULT_TIMEOUT
    #: --registry-min-rate: bytes per second a transfer must keep up on average
    min_rate: int = DEFAULT_MIN_RATE
