"""One HTTP session per registry host: scheme, TLS and authentication.

`open_session` is the only entry point the client uses. It builds the TLS context
(`tls.py`), the authentication flow (`auth.py`, credentials from `credentials.py`) and
then pings `GET /v2/` once: that decides the scheme (HTTPS; plain HTTP only when TLS
verification is off and the registry does not speak TLS, skopeo's meaning of
`--*-tls-verify=false`) and teaches the auth flow the registry's challenge, so that every
later request, streamed uploads included, is authorized before it is sent. Callers never
see a 401: a refusal is a `RegistryAccessError`.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass, field

import httpx
from httpx._utils import get_environment_proxies  # httpx's own reading of them

from estargz_opt.errors import RegistryAccessError
from estargz_opt.stores.registry import credentials
from estargz_opt.stores.registry.auth import RegistryAuth
from estargz_opt.stores.registry.limits import Limit, Limits, Transport
from estargz_opt.stores.registry.options import RegistryOptions
from estargz_opt.stores.registry.tls import TlsConfig, tls_config

#: Per-read timeouts: connecting is quick or it fails; reads wait for a slow registry.
#: A whole request is bounded by `Session.limit` (limits.py).
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
#: Redirects followed per request: a CDN needs one or two; more is a loop.
MAX_REDIRECTS = 10
#: The TLS alerts (OpenSSL's reason names) a server sends when it requires a client
#: certificate it did not get, or does not accept the one it got.
CLIENT_CERT_ALERTS = (
    "BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "ACCESS_DENIED",
)


@dataclass(slots=True)
class Session:
    """An open HTTP session to one registry host."""

    host: str
    #: "https://HOST" or, with TLS verification off and no TLS answer, "http://HOST"
    base_url: str
    client: httpx.Client
    #: the flow `client` authenticates with; it owns every "unauthorized" message
    auth: RegistryAuth = field(repr=False)
    tls: TlsConfig = field(repr=False)
    #: the bounds each thread's request under way obeys
    limits: Limits = field(repr=False)
    #: the bounds of a request whose answer is small (`Limit.reading` for bigger ones)
    limit: Limit = field(repr=False)

    def failure(self, exc: httpx.HTTPError | httpx.InvalidURL) -> TransportFailure:
        """Why the request under way failed: its bounds, or `request_failure`."""
        cut = self.limits.exceeded()
        if cut is not None:
            return TransportFailure(cut, retryable=False)
        return request_failure(self.host, exc, self.tls)

    @property
    def credential_source(self) -> str:
        """Where the host-wide credentials came from ("none" when anonymous);
        `auth.credential_source(repo)` also sees namespaced auth-file keys."""
        return self.auth.credential_source(None)

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """Why a request got no answer, in words, and whether trying again may help."""

    reason: str
    #: a refused connection, a timeout or a temporary DNS failure may pass; a TLS
    #: failure or an unknown host name does not
    retryable: bool


def open_session(host: str, opts: RegistryOptions) -> Session:
    """A session to `host` (HOST[:PORT]); plain HTTP only when TLS verification is off."""
    tls = tls_config(host, opts)
    auth = RegistryAuth(
        host, lambda repo: credentials.lookup(host, repo, opts), credentials.searched(opts)
    )
    auth.credential(None)  # a bad auth file fails here, before any request
    limits = Limits()
    # Identity: bodies come as stored; a server that encodes anyway is decoded under
    # our caps (limits.read_whole), never by httpx.
    client = httpx.Client(
        timeout=TIMEOUT,
        transport=Transport(tls.context, limits),
        mounts=_proxies(tls, limits),
        auth=auth,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        headers={"Accept-Encoding": "identity"},
    )
    session = Session(host, "", client, auth, tls, limits, Limit(opts.timeout, opts.min_rate))
    try:
        session.base_url = _ping(session, opts)
    except BaseException:
        client.close()
        raise
    return session


def _proxies(tls: TlsConfig, limits: Limits) -> dict[str, httpx.BaseTransport | None]:
    """The proxies the environment names (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY), as httpx
    reads them when it makes its own transports, which a custom one turns off; each on
    a transport that obeys `limits` too (None: that pattern goes direct)."""
    return {
        pattern: None if url is None else Transport(tls.context, limits, httpx.Proxy(url))
        for pattern, url in get_environment_proxies().items()
    }


def _ping(session: Session, opts: RegistryOptions) -> str:
    """The base URL that answers `GET /v2/` (any HTTP status will do: a 401 is the
    challenge the auth flow remembers)."""
    host = session.host

    def get(url: str) -> None:
        """GET `url`; a TransportError when no server answered there (the caller may
        try plain HTTP), else one line for an answer that cannot be used."""
        with session.limits.applied(session.limit):
            try:
                session.client.get(url).close()
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                reason = session.limits.exceeded() or _misdirected(exc)
                if reason is None and isinstance(exc, httpx.TransportError):
                    raise
                reason = reason or session.failure(exc).reason
                raise RegistryAccessError(f"registry {host}: {reason} ({url})") from None

    try:
        get(f"https://{host}/v2/")
        return f"https://{host}"
    except httpx.TransportError as e:
        https_error = e
    # A TLS alert proves the server speaks TLS: plain HTTP would only hide the reason.
    if (
        not opts.tls_verify
        and not _refused_or_unresolved(https_error)
        and _server_alert(https_error) is None
    ):
        try:
            get(f"http://{host}/v2/")
            return f"http://{host}"
        except httpx.TransportError:
            pass
    raise describe_transport_error(host, https_error, session.tls) from None


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _server_alert(exc: BaseException) -> str | None:
    """The TLS alert the server sent, as OpenSSL names it ("BAD_CERTIFICATE"), if any."""
    for c in _causes(exc):
        reason = getattr(c, "reason", None) if isinstance(c, ssl.SSLError) else None
        if isinstance(reason, str) and "_ALERT_" in reason:
            return reason.split("_ALERT_", 1)[1]
    return None


def _client_cert_error(alert: str, tls: TlsConfig) -> str:
    said = alert.lower().replace("_", " ")
    if tls.client_cert is None:
        return (
            "TLS: the registry requires a client certificate and none was presented "
            f"(TLS alert: {said}); put one as a NAME.cert + NAME.key pair in "
            f"{tls.suggested_dir} "
            "(or pass --src-cert-dir/--dest-cert-dir)"
        )
    return (
        f"TLS: the registry refused the client certificate {tls.client_cert} (TLS "
        f"alert: {said}); it must be signed by a CA the registry trusts for clients "
        "(its tls.clientcas) and be valid now"
    )


def _refused_or_unresolved(exc: BaseException) -> bool:
    return any(isinstance(c, socket.gaierror | ConnectionRefusedError) for c in _causes(exc))


def describe_transport_error(host: str, exc: BaseException, tls: TlsConfig) -> RegistryAccessError:
    """One line for a registry that cannot be reached: DNS, refused, TLS or other."""
    return RegistryAccessError(f"registry {host}: {transport_failure(host, exc, tls).reason}")


def _misdirected(exc: httpx.HTTPError | httpx.InvalidURL) -> str | None:
    """Why a request went nowhere, when a redirect or a URL sent it nowhere."""
    if isinstance(exc, httpx.TooManyRedirects):
        return (
            f"more than {MAX_REDIRECTS} redirects (a redirect loop?), the last to {exc.request.url}"
        )
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return f"unusable URL ({exc})"
    if isinstance(exc, httpx.RemoteProtocolError) and str(exc).startswith(
        "Invalid URL in location header"
    ):
        # httpx's words for a redirect to a URL it cannot parse
        return f"a redirect to an unusable URL ({exc})"
    return None


def request_failure(
    host: str, exc: httpx.HTTPError | httpx.InvalidURL, tls: TlsConfig
) -> TransportFailure:
    """`transport_failure`, and the failures that no retry mends: a redirect loop or a
    URL httpx cannot use (`_misdirected`), a body it cannot send again."""
    reason = _misdirected(exc)
    if reason is not None:
        return TransportFailure(reason, retryable=False)
    if isinstance(exc, httpx.TransportError):
        return transport_failure(host, exc, tls)
    return TransportFailure(f"{type(exc).__name__}: {exc}", retryable=False)


def transport_failure(host: str, exc: BaseException, tls: TlsConfig) -> TransportFailure:
    """Why a request to `host` got no answer (the one wording the session's first request
    and the client's later ones share), and whether it is worth retrying."""
    chain = _causes(exc)
    text = " ".join(str(c) for c in chain)
    verify = next((c for c in chain if isinstance(c, ssl.SSLCertVerificationError)), None)
    if verify is not None or "CERTIFICATE_VERIFY_FAILED" in text:
        reason = getattr(verify, "verify_message", None) or "certificate verify failed"
        return TransportFailure(
            f"TLS certificate verification failed ({reason}); put the registry's CA "
            f"certificate as a *.crt file in {tls.suggested_dir} (or pass --src-cert-dir/"
            "--dest-cert-dir), or use --src-tls-verify=false/--dest-tls-verify=false",
            retryable=False,
        )
    alert = _server_alert(exc)
    if alert is not None and alert in CLIENT_CERT_ALERTS:
        return TransportFailure(_client_cert_error(alert, tls), retryable=False)
    unresolved = next((c for c in chain if isinstance(c, socket.gaierror)), None)
    if (
        unresolved is not None
        or "Name or service not known" in text
        or "nodename nor servname" in text
    ):
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        # A resolver that could not answer for now (EAI_AGAIN) may answer on a retry.
        return TransportFailure(
            f"cannot resolve the host name {name} (DNS)",
            retryable=unresolved is not None and unresolved.errno == socket.EAI_AGAIN,
        )
    if (
        any(isinstance(c, ConnectionRefusedError) for c in chain)
        or f"[Errno {errno.ECONNREFUSED}]" in text
    ):
        return TransportFailure(
            "connection refused (is a registry listening there?)", retryable=True
        )
    ssl_error = next((c for c in chain if isinstance(c, ssl.SSLError)), None)
    if ssl_error is not None:
        # OpenSSL's name for an answer that is no TLS record: a plain-HTTP server.
        plain = ssl_error.reason == "WRONG_VERSION_NUMBER"
        return TransportFailure(
            f"TLS: {'the registry does not speak TLS' if plain else 'the handshake failed'} "
            f"({chain[-1]}); for a plain-HTTP registry use --tls-verify=false "
            "(--src-tls-verify=false/--dest-tls-verify=false with optimize)",
            retryable=False,
        )
    if isinstance(exc, httpx.TimeoutException):
        return TransportFailure(f"no answer in time ({type(exc).__name__})", retryable=True)
    if isinstance(exc, httpx.ConnectError):
        return TransportFailure(f"cannot connect ({exc or type(exc).__name__})", retryable=True)
    # The connection broke off after it was made (a reset, a registry that went away).
    return TransportFailure(str(exc) or type(exc).__name__, retryable=True)
