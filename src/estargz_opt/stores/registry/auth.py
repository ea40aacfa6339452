"""Registry authentication as an `httpx.Auth` flow: Basic, and the bearer-token flow
that `WWW-Authenticate` asks for (the distribution token spec).

The flow derives the token scope from each request: the repository from the
`/v2/<name>/...` path, `pull` for GET/HEAD and `pull,push` otherwise, plus
`repository:<from>:pull` for a cross-repository mount, so one token request carries every
scope a request needs. Tokens are cached per scope set and fetched again on expiry or
on a 401.

httpx streams request bodies, and a streamed body cannot be sent twice. So the flow
authorizes *before* sending whenever it knows the registry's challenge (learned from the
session's first request, a GET `/v2/`), and only a replayable request is retried after a
401. A request still refused after that raises `RegistryAccessError`, naming the
credential source; no secret ever goes into a message or a log record.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from estargz_opt import jsonlimits
from estargz_opt.errors import BadInputError, RegistryAccessError
from estargz_opt.stores.registry.credentials import Credential
from estargz_opt.stores.registry.limits import SMALL, BodyError, read_whole

log = logging.getLogger("estargz_opt")

#: How long a token lives when its server does not say (the token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
#: A token this close to its expiry is fetched again before a request is sent (a
#: quarter of its lifetime for shorter-lived tokens), so that a streamed upload, which
#: cannot be replayed after a 401, never goes out with a token about to lapse.
EXPIRY_MARGIN = 10.0
#: `client_id` sent with an identity-token exchange.
CLIENT_ID = "estargz-opt"

_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')

Scopes = frozenset[str]
CredentialLookup = Callable[[str | None], Credential | None]


@dataclass(frozen=True, slots=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """`Bearer realm="…",service="…",scope="…"` and `Basic realm="…"`, one or more per
    header."""
    out: list[Challenge] = []
    for header in headers:
        rest = header.strip()
        while rest:
            m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
            if m is None:
                break
            scheme, rest = m.group(1).lower(), rest[m.end() :]
            params: dict[str, str] = {}
            while (p := _PARAM.match(rest)) and p.group(0):
                value = p.group(2) if p.group(2) is not None else p.group(3) or ""
                params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
                rest = rest[p.end() :]
            out.append(Challenge(scheme, params))
    return out


def _merge(scopes: list[str]) -> Scopes:
    """Scope strings with the actions of each resource united, so that
    `repository:a:pull` and `repository:a:push` become `repository:a:pull,push`."""
    actions: dict[str, set[str]] = {}
    for scope in scopes:
        resource, sep, acts = scope.rpartition(":")
        if not sep or ":" not in resource:
            continue
        actions.setdefault(resource, set()).update(a for a in acts.split(",") if a)
    return frozenset(f"{r}:{','.join(sorted(a))}" for r, a in actions.items())


def request_scopes(request: httpx.Request) -> tuple[str | None, Scopes]:
    """The repository a request is about (None for `/v2/` itself) and the scopes it
    needs."""
    m = _PATH.match(request.url.path)
    if m is None:
        if request.url.path.rstrip("/") == "/v2/_catalog":
            return None, frozenset({"registry:catalog:*"})
        return None, frozenset()
    name = m.group("name")
    push = request.method not in ("GET", "HEAD")
    scopes = [f"repository:{name}:{'pull,push' if push else 'pull'}"]
    source = request.url.params.get("from")
    if push and request.url.params.get("mount") and source:
        scopes.append(f"repository:{source}:pull")
    return name, _merge(scopes)


def _choose(response: httpx.Response) -> Challenge | None:
    """The challenge of a 401 that the flow can answer: bearer with a realm, else basic."""
    challenges = parse_challenges(response.headers.get_list("www-authenticate"))
    return next(
        (c for c in challenges if c.scheme == "bearer" and "realm" in c.params),
        next((c for c in challenges if c.scheme == "basic"), None),
    )


def _replayable(request: httpx.Request) -> bool:
    """A request whose body can be sent again (none, or bytes in memory)."""
    return isinstance(request.stream, httpx.ByteStream)


def _realm_url(host: str, realm: str) -> httpx.URL:
    """The token realm a registry announced, if it is an http(s) URL; else one line."""
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise RegistryAccessError(
            f"registry {host}: its token realm {realm[:200]!r} is not an http(s) URL"
        )
    return url


def _basic(cred: Credential) -> str:
    return "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    #: time.monotonic() after which the token is fetched again rather than sent
    fresh_until: float


def token_lifetime(body: object) -> float:
    """Seconds a token answer says its token lives: `expires_in` as given, however
    short (a server that issues 5-second tokens means it; Docker's 60-second floor
    would send lapsed tokens), the spec's default when absent or unusable."""
    value = body.get("expires_in") if isinstance(body, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_TOKEN_LIFETIME


class RegistryAuth(httpx.Auth):
    """Authentication for one registry host, shared by every request of a session
    (thread-safe: layers are fetched in parallel)."""

    def __init__(
        self, host: str, credentials: CredentialLookup, searched: Sequence[Path] = ()
    ) -> None:
        self.host = host
        self._lookup = credentials
        #: the auth files the lookup reads, named when it finds nothing
        self._searched = tuple(searched)
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[Scopes, _Token] = {}
        #: one lock per scope set while its token is being fetched
        self._fetching: dict[Scopes, threading.Lock] = {}
        #: scope sets the registry asked to widen (its 401 named more), so that the next
        #: such request asks for the wider set at once
        self._widened: dict[Scopes, Scopes] = {}
        self._creds: dict[str | None, Credential | None] = {}
        #: held while a credential is looked up, so that a helper runs once per repository
        self._lookup_lock = threading.Lock()

    # -------------------------------------------------------------- the flow

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self.ours(request.url):
            # An upload Location or a redirect on another host: no credentials go there.
            yield request
            return
        repo, derived = request_scopes(request)
        ping = repo is None and not derived
        with self._lock:
            scopes = self._widened.get(derived, derived)
        if not ping:
            yield from self._authorize(request, repo, scopes, refused=None)
        response = yield request
        if response.status_code != 401 or not self.ours(response.url):
            # A 401 from a host a redirect led to is that host's business: its challenge
            # is neither learned nor answered (the caller names the refusal).
            return
        challenge = self._pick(response)
        if challenge is None or ping:
            return
        if not _replayable(request):
            # The body has gone; pre-authorization was refused: nothing to retry.
            raise self._refused(repo, challenge)
        log.debug(
            "registry %s: %s %s answered 401; authorizing again",
            self.host,
            request.method,
            request.url.path,
        )
        wider = _merge([*scopes, *challenge.params.get("scope", "").split()])
        if wider != scopes:
            with self._lock:
                self._widened[derived] = wider
        sent = request.headers.get("Authorization", "")
        refused = sent.removeprefix("Bearer ") if sent.startswith("Bearer ") else None
        yield from self._authorize(request, repo, wider, refused)
        response = yield request
        if response.status_code == 401:
            raise self._refused(repo, self._pick(response) or challenge)

    def ours(self, url: httpx.URL) -> bool:
        """Whether `url` is on this registry (a default port written out counts)."""
        default = {"https": 443, "http": 80}.get(url.scheme)
        host = f"[{url.host}]" if ":" in url.host else url.host
        netloc = host if url.port in (None, default) else f"{host}:{url.port}"
        return netloc in (self.host, self.host.removesuffix(f":{default}"))

    def _pick(self, response: httpx.Response) -> Challenge | None:
        """Remember the registry's challenge (bearer preferred) for pre-authorization."""
        chosen = _choose(response)
        if chosen is not None:
            with self._lock:
                known, self._challenge = self._challenge, chosen
            if known is None or (known.scheme, known.params.get("realm")) != (
                chosen.scheme,
                chosen.params.get("realm"),
            ):
                log.debug(
                    "registry %s: %s auth%s",
                    self.host,
                    chosen.scheme,
                    f" (token realm {chosen.params['realm']})" if chosen.scheme == "bearer" else "",
                )
        return chosen

    def _authorize(
        self, request: httpx.Request, repo: str | None, scopes: Scopes, refused: str | None
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Set the request's Authorization; `refused` is a token the registry just
        answered 401 to, which is not to be used again."""
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return
        cred = self.credential(repo)
        if challenge.scheme == "basic":
            if cred is not None and cred.username:
                request.headers["Authorization"] = _basic(cred)
            return
        token = yield from self._token(challenge, repo, scopes, cred, refused)
        request.headers["Authorization"] = f"Bearer {token}"

    # -------------------------------------------------------------- tokens

    def _token(
        self,
        challenge: Challenge,
        repo: str | None,
        scopes: Scopes,
        cred: Credential | None,
        refused: str | None,
    ) -> Generator[httpx.Request, httpx.Response, str]:
        """A token for `scopes`: the cached one, else one fetched while other threads
        that need the same scopes wait for it (parallel layer requests ask once)."""
        with self._lock:
            fetching = self._fetching.setdefault(scopes, threading.Lock())
        with fetching:
            with self._lock:
                cached = self._tokens.get(scopes)
            if (
                cached is not None
                and cached.value != refused
                and cached.fresh_until > time.monotonic()
            ):
                return cached.value
            return (yield from self._fetch_token(challenge, repo, scopes, cred))

    def _fetch_token(
        self, challenge: Challenge, repo: str | None, scopes: Scopes, cred: Credential | None
    ) -> Generator[httpx.Request, httpx.Response, str]:
        now = time.monotonic()
        realm = _realm_url(self.host, challenge.params["realm"])
        service = challenge.params.get("service")
        ordered = sorted(scopes)
        if cred is not None and cred.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "client_id": CLIENT_ID,
                **({"service": service} if service else {}),
                **({"scope": " ".join(ordered)} if ordered else {}),
            }
            token_request = httpx.Request("POST", realm, data=form)
        else:
            query = httpx.QueryParams(
                [*([("service", service)] if service else []), *(("scope", s) for s in ordered)]
            )
            headers = {"Authorization": _basic(cred)} if cred is not None and cred.username else {}
            token_request = httpx.Request("GET", realm, params=query, headers=headers)
        realm_host = realm.netloc.decode("ascii")
        log.debug(
            "registry %s: token for %s from %s, with %s",
            self.host,
            " ".join(ordered) or "no scope",
            realm_host,
            "anonymous access" if cred is None else cred.source,
        )
        response = yield token_request
        try:
            # read by httpx (it reads it again once the flow moves on), within the
            # request's byte cap (limits.py)
            response.read()
            raw = read_whole(response, SMALL)
        except (BodyError, httpx.HTTPError) as exc:
            raise RegistryAccessError(
                f"registry {self.host}: its token server {realm_host}: {exc}"
            ) from None
        if response.status_code in (401, 403):
            raise self._refused(repo, challenge, f"the token server {realm_host}")
        if not response.is_success:
            raise RegistryAccessError(
                f"registry {self.host}: its token server {realm_host} "
                f"answered HTTP {response.status_code}"
            )
        try:
            body = jsonlimits.loads_object(raw, "token", max_size=SMALL)
            value = body.get("token") or body.get("access_token")
        except BadInputError:
            body, value = {}, None
        if not isinstance(value, str) or not value:
            raise RegistryAccessError(
                f"registry {self.host}: its token server {realm_host} sent no token"
            )
        # `now` is when the request left: the server's clock started later.
        lifetime = token_lifetime(body)
        with self._lock:
            self._tokens[scopes] = _Token(value, now + lifetime - min(EXPIRY_MARGIN, lifetime / 4))
        return value

    # -------------------------------------------------------------- credentials, errors

    def credential(self, repo: str | None) -> Credential | None:
        """The credential for `repo`, looked up once (a helper is run only once)."""
        with self._lookup_lock:
            if repo not in self._creds:
                self._creds[repo] = self._lookup(repo)
            return self._creds[repo]

    def credential_source(self, repo: str | None) -> str:
        cred = self.credential(repo)
        return cred.source if cred is not None else "none"

    def refusal(self, repo: str | None, response: httpx.Response) -> RegistryAccessError:
        """The one line for a 401 the flow passed on (one with no challenge it can answer,
        or from another host): the same words as the refusals it raises itself."""
        with self._lock:
            known = self._challenge
        return self._refused(repo, _choose(response) or known)

    def _refused(
        self, repo: str | None, challenge: Challenge | None, by: str | None = None
    ) -> RegistryAccessError:
        cred = self.credential(repo)
        what = f"registry {self.host}: unauthorized"
        if repo:
            what += f" for repository {repo}"
        if by:
            what += f" ({by} refused the login)"
        if challenge is not None and challenge.params.get("error") == "insufficient_scope":
            # The registry's own scope string lists actions in no fixed order (distribution
            # builds it from a map): normalized, so the message is the same every time.
            scope = challenge.params.get("scope")
            wanted = (
                (" ".join(sorted(_merge(scope.split()))) or scope)
                if scope
                else ("the access it needs")
            )
            return RegistryAccessError(
                f"{what}: the token obtained with "
                f"{'no credentials' if cred is None else 'the credentials from ' + cred.source}"
                f" does not grant {wanted}"
            )
        if cred is None:
            where = ", ".join(f"{p}{'' if p.exists() else ' (absent)'}" for p in self._searched)
            return RegistryAccessError(
                f"{what}: no credentials were found"
                + (f" in {where}" if where else "")
                + " (pass --src-creds/--dest-creds or --authfile, or log in with "
                "podman/skopeo/docker login)"
            )
        scheme = challenge.scheme if challenge is not None else None
        if scheme == "basic" and cred.identity_token and not cred.username:
            return RegistryAccessError(
                f"{what}: {cred.source} gave an identity token (user <token>), which only "
                "a token server exchanges, and the registry asks for basic auth"
            )
        return RegistryAccessError(
            f"{what}: the credentials from {cred.source} were refused"
            + (f" ({scheme} auth)" if scheme else "")
        )
