"""One HTTP session per registry host: scheme, TLS and authentication.

`open_session` is the only entry point the client uses. Authentication is an
`httpx.Auth` flow that derives the token scope from each request (repository from the
`/v2/<name>/...` path, pull for GET/HEAD, pull+push otherwise, plus pull on the `from=`
repository of a mount), so the client never handles a 401 itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from estargz_opt.stores.registry.options import RegistryOptions

#: Per-request timeouts: connecting is quick or it fails; reads wait for a slow registry.
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@dataclass(slots=True)
class Session:
    """An open HTTP session to one registry host."""

    host: str
    #: "https://HOST" or, with TLS verification off and no TLS answer, "http://HOST"
    base_url: str
    client: httpx.Client
    #: where the credentials came from, for error messages ("none" when anonymous)
    credential_source: str

    def close(self) -> None:
        self.client.close()


def open_session(host: str, opts: RegistryOptions) -> Session:
    """A session to `host` (HOST[:PORT]); plain HTTP only when TLS verification is off.

    Placeholder until the auth/TLS work lands: anonymous, system roots, and with
    tls_verify off plain HTTP for loopback registries.
    """
    scheme = "https" if opts.tls_verify else "http"
    client = httpx.Client(timeout=TIMEOUT, verify=opts.tls_verify, follow_redirects=True)
    return Session(host, f"{scheme}://{host}", client, "none")
