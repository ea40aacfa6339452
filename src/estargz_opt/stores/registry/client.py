"""The distribution API (OCI distribution spec) for one repository, over a `Session`.

Every request goes to `session.base_url + /v2/<repo>/...` through `session.client`, whose
auth flow answers 401s; this module never sees credentials. It retries what is worth
retrying (connection errors, 408, 429 with Retry-After, 5xx), bounded in tries and in
time, and turns every failure into one line naming the registry, the repository and the
reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urljoin

import httpx

from estargz_opt import descriptor as d, jsonlimits
from estargz_opt.constants import MAX_MANIFEST_SIZE
from estargz_opt.descriptor import Descriptor
from estargz_opt.digest import digest_of, hasher, sha256_digest
from estargz_opt.errors import BadInputError, RegistryAccessError, RegistryError
from estargz_opt.stores.registry.limits import SMALL, BodyError, Limit, read_whole
from estargz_opt.stores.registry.session import Session

log = logging.getLogger("estargz_opt")

#: What we ask for when resolving a reference: every manifest and index type we read.
MANIFEST_ACCEPT = ", ".join([d.OCI_INDEX, d.OCI_MANIFEST, d.DOCKER_LIST, d.DOCKER_MANIFEST])
#: Registries commonly refuse manifests over 4 MiB; a bigger answer is not a manifest.
#: Read and upload in pieces of this size (memory stays flat whatever the blob's size).
PIECE = 1 << 20
#: Chunked uploads: pieces of this size unless the registry asks for bigger ones.
CHUNK = 16 << 20
#: ... halved on each 413, down to this.
MIN_CHUNK = 64 << 10
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry a request that failed in a way worth retrying."""

    tries: int = 5
    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 10.0
    #: no retry starts after this many seconds since the first try
    total: float = 60.0


class Retry(Exception):
    """A try failed in a way worth retrying (internal to `Client._send`)."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


@dataclass(slots=True)
class Upload:
    """An open upload session: where to send the next request."""

    location: str
    offset: int = 0
    #: OCI-Chunk-Min-Length: the registry wants chunks at least this large
    min_chunk: int = 0
    #: the registry refused a whole body (413): send this blob again in chunks
    whole_refused: bool = False


class Client:
    """One repository on one registry."""

    def __init__(self, session: Session, repository: str, retry: RetryPolicy | None = None):
        self.session = session
        self.repository = repository
        self.retry = retry or RetryPolicy()
        self.where = f"registry {session.host}, repository {repository}"
        #: set when the run is over: uploads still streaming stop at their next piece
        self.stopped = threading.Event()

    # ------------------------------------------------------------------ requests

    def url(self, tail: str) -> str:
        return f"{self.session.base_url}/v2/{self.repository}/{tail}"

    def _location(self, resp: httpx.Response, what: str) -> str:
        """The response's Location as an absolute URL: a relative one is relative to the
        URL that answered (RFC 9110), which a redirect may have moved to another host."""
        location = resp.headers.get("Location", "")
        try:
            url = httpx.URL(urljoin(str(resp.url), location))
        except (httpx.InvalidURL, ValueError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise RegistryError(
                f"{self.where}: {what}: the registry sent an unusable Location {location[:200]!r}"
            )
        return str(url)

    @contextlib.contextmanager
    def _bounded(self, limit: Limit | None = None) -> Iterator[None]:
        """Bound the requests made in the block, and the reading of their answers, by
        `limit` (the session's small-answer bounds by default); each try restarts it."""
        with self.session.limits.applied(limit or self.session.limit):
            yield

    def _send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        ok: Callable[[httpx.Response], bool],
        stream: bool = False,
        **kw: object,
    ) -> httpx.Response:
        """One request, retried while it fails in a retryable way (`_once`)."""
        return self._retrying(
            what, lambda: self._once(method, url, what, ok=ok, stream=stream, **kw)
        )

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """`attempt()` again, with backoff, each time it raises Retry, within the policy."""
        started = time.monotonic()
        delay = self.retry.first_delay
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except Retry as exc:
                elapsed = time.monotonic() - started
                wait = exc.after if exc.after is not None else delay
                if tries >= self.retry.tries or elapsed + wait > self.retry.total:
                    raise RegistryError(
                        f"{self.where}: {what} failed: {exc.reason} (after {tries} tries)"
                    ) from None
                log.info("%s: %s: %s; retrying in %.1fs", self.where, what, exc.reason, wait)
                time.sleep(wait)
                delay = min(delay * self.retry.factor, self.retry.max_delay)

    def _once(
        self,
        method: str,
        url: str,
        what: str,
        *,
        ok: Callable[[httpx.Response], bool],
        stream: bool = False,
        **kw: object,
    ) -> httpx.Response:
        """One try: the answer if `ok` accepts it; Retry if it failed in a way worth
        retrying (connection error, 408, 429, 5xx); else a RegistryError naming why.
        `kw['content']` may be a callable making a fresh body (a stream is never replayed
        half-read). A streamed answer must be closed by the caller, and read inside
        `_bounded` (else it is read unbounded)."""
        if self.session.limits.current() is None:
            with self._bounded():
                return self._once(method, url, what, ok=ok, stream=stream, **kw)
        args = dict(kw)
        if callable(args.get("content")):
            args["content"] = args["content"]()  # type: ignore[operator]
        self.session.limits.restart()
        try:
            req = self.session.client.build_request(method, url, **args)  # type: ignore[arg-type]
            resp = self.session.client.send(req, stream=stream)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            failure = self.session.failure(exc)
            if not failure.retryable:
                raise RegistryError(f"{self.where}: {what}: {failure.reason}") from None
            raise Retry(failure.reason) from exc
        if ok(resp):
            return resp
        if resp.status_code in _RETRY_STATUS:
            after = _retry_after(resp.headers.get("Retry-After"))
            reason = f"{resp.status_code} {resp.reason_phrase}".strip()
            resp.close()
            raise Retry(reason, after)
        try:
            raise self.error(resp, what)
        finally:
            resp.close()

    def error(self, resp: httpx.Response, what: str) -> RegistryError | RegistryAccessError:
        """The one line for an answer we cannot use."""
        code, message = self._error_body(resp)
        status = resp.status_code
        if status == 401 and not self.session.auth.ours(resp.url):
            return RegistryError(
                f"{self.where}: {what}: {resp.url.netloc.decode('ascii')}, where a redirect "
                "led, answered 401 Unauthorized (credentials go to the registry and its "
                "token server only)"
            )
        if status == 401:
            # the auth flow answers every 401 it can; what it passes on it words as well
            return self.session.auth.refusal(self.repository, resp)
        if status == 403:
            reason = "denied" + (f": {message}" if message else "")
        elif status == 404 and code == "NAME_UNKNOWN":
            reason = "repository not found"
        elif status == 404:
            reason = "not found"
        else:
            reason = f"{status} {resp.reason_phrase}".strip() + (f": {message}" if message else "")
        return RegistryError(f"{self.where}: {what}: {reason}")

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, reference: str, what: str) -> tuple[Descriptor, bytes]:
        """The manifest or index `reference` (tag or digest) names, with its descriptor."""
        with self._bounded(self.session.limit.reading(MAX_MANIFEST_SIZE)):
            resp = self._send(
                "GET",
                self.url(f"manifests/{reference}"),
                what,
                ok=lambda r: r.status_code in (200, 404),
                stream=True,
                headers={"Accept": MANIFEST_ACCEPT},
            )
            if resp.status_code == 404:
                error = self.error(resp, what)
                resp.close()
                if not self._repository_exists():
                    raise RegistryError(f"{self.where}: {what}: repository not found")
                raise error
            with contextlib.closing(resp):
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                    raise RegistryError(
                        f"{self.where}: {what}: manifest too large ({length} bytes; the "
                        f"limit is {MAX_MANIFEST_SIZE})"
                    )
                data = self._whole(resp, MAX_MANIFEST_SIZE, what)
        # Checked here, so that no deeper parse meets an unbounded document.
        jsonlimits.loads_object(data, f"{self.where}: {what}", max_size=MAX_MANIFEST_SIZE)
        media_type = resp.headers.get("Content-Type", "").partition(";")[0].strip()
        if media_type not in d.INDEX_TYPES | d.MANIFEST_TYPES:
            media_type = sniff_type(data) or media_type
        digest = sha256_digest(data)
        return Descriptor(media_type, digest, len(data)), data

    def _repository_exists(self) -> bool:
        """Whether the repository is known (registries answer an unknown tag and an
        unknown repository alike on manifests; the tag list tells them apart)."""
        with self._bounded():  # a small answer, though asked while reading a manifest
            resp = self._send(
                "GET",
                self.url("tags/list"),
                "listing tags",
                ok=lambda r: r.status_code in (200, 401, 403, 404),
                params={"n": "1"},
            )
        return resp.status_code != 404

    def manifest_size(self, digest: str) -> int | None:
        resp = self._send(
            "HEAD",
            self.url(f"manifests/{digest}"),
            f"manifest {digest}",
            ok=lambda r: r.status_code in (200, 404),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        length = resp.headers.get("Content-Length", "")
        return int(length) if resp.status_code == 200 and length.isdigit() else None

    def has_manifest(self, reference: str) -> bool:
        """Whether the tag or digest names a manifest (HEAD; nothing of it is read)."""
        resp = self._send(
            "HEAD",
            self.url(f"manifests/{reference}"),
            f"manifest {reference}",
            ok=lambda r: r.status_code in (200, 404),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        return resp.status_code == 200

    def referrers(self, digest: str) -> bytes | None:
        """The OCI 1.1 referrers index of `digest`, or None where the registry has no
        referrers API (it answers 404, as docker-registry 2.8 does)."""
        what = f"referrers of {digest}"
        with self._bounded(self.session.limit.reading(MAX_MANIFEST_SIZE)):
            resp = self._send(
                "GET",
                self.url(f"referrers/{digest}"),
                what,
                ok=lambda r: r.status_code in (200, 404),
                stream=True,
                headers={"Accept": d.OCI_INDEX},
            )
            with contextlib.closing(resp):
                if resp.status_code == 404:
                    return None
                data = self._whole(resp, MAX_MANIFEST_SIZE, what)
        jsonlimits.loads_object(data, f"{self.where}: {what}", max_size=MAX_MANIFEST_SIZE)
        return data

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> None:
        self._send(
            "PUT",
            self.url(f"manifests/{reference}"),
            f"pushing manifest {reference}",
            ok=lambda r: r.status_code in (200, 201),
            content=data,
            headers={"Content-Type": media_type},
        )

    # ------------------------------------------------------------------ blobs

    def blob_size(self, digest: str) -> int | None:
        """The size of a blob the repository holds (HEAD), or None."""
        resp = self._send(
            "HEAD",
            self.url(f"blobs/{digest}"),
            f"blob {digest}",
            ok=lambda r: r.status_code in (200, 404),
        )
        length = resp.headers.get("Content-Length", "")
        return int(length) if resp.status_code == 200 and length.isdigit() else None

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        """A small blob (config), read whole: no more than its descriptor says, and never
        more than a JSON document may hold."""
        if desc.size > jsonlimits.MAX_DOCUMENT:
            raise RegistryError(
                f"{self.where}: {what}: {desc.size} bytes, too large to read "
                f"whole (the limit is {jsonlimits.MAX_DOCUMENT})"
            )
        with self._bounded(self.session.limit.reading(desc.size)):
            resp = self._send(
                "GET",
                self.url(f"blobs/{desc.digest}"),
                what,
                ok=lambda r: r.status_code == 200,
                stream=True,
            )
            with contextlib.closing(resp):
                return self._whole(resp, desc.size, what)

    def _whole(self, resp: httpx.Response, cap: int, what: str) -> bytes:
        """`read_whole`, its failures and a cut-off transfer in one line."""
        try:
            return read_whole(resp, cap)
        except BodyError as exc:
            raise RegistryError(f"{self.where}: {what}: {exc}") from None
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"{self.where}: {what}: {self.session.failure(exc).reason}"
            ) from None

    def _error_body(self, resp: httpx.Response) -> tuple[str, str]:
        """The first (code, message) of a distribution error body, or ("", "")."""
        try:
            raw = read_whole(resp, SMALL)
            errors = jsonlimits.loads_object(raw, "error", max_size=SMALL).get("errors")
            first = errors[0] if isinstance(errors, list) and errors else {}
            if not isinstance(first, dict):
                return "", ""
            message = " ".join(str(first.get("message", "")).split())[:500]
            return str(first.get("code", ""))[:100], message
        except (BodyError, BadInputError, httpx.HTTPError):
            return "", ""

    def download(self, desc: Descriptor, what: str, out: BinaryIO) -> None:
        """Stream the blob into `out` through its digest check; a download that does not
        match is fetched once more, then fails naming the digest."""
        for attempt in (1, 2):
            with self._bounded(self.session.limit.reading(desc.size)):
                if self._download_once(desc, what, out, attempt):
                    return
        raise BadInputError(
            f"{self.where}: blob {desc.digest} ({what}) does not match its digest or size "
            "(fetched twice)"
        )

    def _download_once(self, desc: Descriptor, what: str, out: BinaryIO, attempt: int) -> bool:
        """One try of `download`: whether it got the blob. The body is taken as sent
        (a Content-Encoding is the server's mistake: the digest decides)."""
        out.seek(0)
        out.truncate()
        h = hasher()
        size = 0
        resp = self._send(
            "GET",
            self.url(f"blobs/{desc.digest}"),
            f"{what} ({desc.digest})",
            ok=lambda r: r.status_code == 200,
            stream=True,
        )
        try:
            with contextlib.closing(resp):
                for piece in resp.iter_raw(PIECE):
                    if self.stopped.is_set():
                        raise RegistryError(f"{self.where}: download interrupted")
                    h.update(piece)
                    size += len(piece)
                    if size > desc.size:
                        break
                    out.write(piece)
        except httpx.HTTPError as exc:
            cut = self.session.limits.exceeded()
            if attempt == 2 or cut is not None:
                raise RegistryError(
                    f"{self.where}: {what} ({desc.digest}): download failed: {cut or exc}"
                ) from None
            log.warning(
                "%s: %s (%s): download broke off (%s); fetching it again",
                self.where,
                what,
                desc.digest,
                exc,
            )
            return False
        if size == desc.size and digest_of(h) == desc.digest:
            out.flush()
            return True
        if attempt == 1:
            log.warning(
                "%s: %s (%s) does not match its digest or size; fetching it again",
                self.where,
                what,
                desc.digest,
            )
        return False

    def mount(self, digest: str, source_repository: str) -> bool:
        """Cross-repository mount; False (and the session the registry opened instead
        cancelled) when the registry did not mount."""
        resp = self._send(
            "POST",
            self.url("blobs/uploads/"),
            f"mounting blob {digest} from {source_repository}",
            ok=lambda r: r.status_code in (201, 202),
            params={"mount": digest, "from": source_repository},
        )
        if resp.status_code == 201:
            return True
        if "Location" in resp.headers:
            self.cancel(Upload(self._location(resp, f"mounting blob {digest}")))
        return False

    def check_push(self) -> None:
        """Fail now, before any layer is converted, if this repository refuses our pushes:
        opening an upload session makes the auth flow obtain push access (a refusal is
        its one line), and the session is cancelled at once, so nothing is left open."""
        resp = self._send(
            "POST",
            self.url("blobs/uploads/"),
            "checking that we may push",
            ok=lambda r: r.status_code == 202,
        )
        if "Location" in resp.headers:
            self.cancel(Upload(self._location(resp, "checking that we may push")))

    def start_upload(self) -> Upload:
        resp = self._once(
            "POST",
            self.url("blobs/uploads/"),
            "starting an upload",
            ok=lambda r: r.status_code == 202 and "Location" in r.headers,
        )
        min_chunk = resp.headers.get("OCI-Chunk-Min-Length", "")
        return Upload(
            self._location(resp, "starting an upload"),
            min_chunk=int(min_chunk) if min_chunk.isdigit() else 0,
        )

    def cancel(self, upload: Upload) -> None:
        """Cancel an upload session (best effort: it expires on the registry anyway)."""
        with contextlib.suppress(httpx.HTTPError, httpx.InvalidURL), self._bounded():
            self.session.client.delete(upload.location)

    def upload(
        self,
        path: Path,
        digest: str,
        size: int,
        on_start: Callable[[Upload], None],
        *,
        chunked: bool = False,
    ) -> None:
        """Upload the file `path` as blob `digest` (in chunks at once with `chunked`: the
        registry refused it whole). A try that fails in a retryable way starts over with
        a new session (an upload's offset cannot be trusted after a broken request),
        unless the registry turns out to have the blob already."""
        first = True

        def attempt() -> None:
            nonlocal first
            if not first and self.blob_size(digest) == size:
                return  # the last try's commit landed; only its answer was lost
            first = False
            self._upload_once(path, digest, size, on_start, chunked)

        self._retrying(f"uploading blob {digest}", attempt)

    def _upload_once(
        self,
        path: Path,
        digest: str,
        size: int,
        on_start: Callable[[Upload], None],
        chunked: bool,
    ) -> None:
        """POST, then one streamed PATCH, or chunked PATCHes with Content-Range when the
        registry asks for them (OCI-Chunk-Min-Length, 413), then PUT ?digest=."""
        up = self.start_upload()
        on_start(up)
        if not up.min_chunk and not chunked:
            if self._patch(up, path, 0, size, whole=True) != 413:
                self._finish(up, digest)
                return
            log.info("%s: blob %s refused whole (413); uploading it in chunks", self.where, digest)
            self.cancel(up)
            up = self.start_upload()
            on_start(up)
        chunk = max(up.min_chunk, CHUNK)
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            if self._patch(up, path, offset, n, whole=False) != 413:
                offset += n
                continue
            # Refused, so not applied: the same bytes again, in smaller chunks.
            chunk = n // 2
            if chunk < max(up.min_chunk, MIN_CHUNK):
                raise RegistryError(
                    f"{self.where}: uploading blob {digest}: the registry refuses chunks of "
                    f"{n} bytes (413)"
                )
        self._finish(up, digest)

    def _patch(self, up: Upload, path: Path, offset: int, n: int, *, whole: bool) -> int:
        """Send bytes [offset, offset+n) of `path`; the new Location is kept. 413 is
        returned, not raised (the caller falls back to chunks)."""

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(offset)
                left = n
                while left > 0 and (piece := f.read(min(PIECE, left))):
                    if self.stopped.is_set():
                        raise RegistryError(f"{self.where}: upload interrupted")
                    left -= len(piece)
                    yield piece

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(n)}
        if not whole:
            headers["Content-Range"] = f"{offset}-{offset + n - 1}"
        resp = self._once(
            "PATCH",
            up.location,
            "uploading a blob",
            ok=lambda r: r.status_code in (202, 413),
            content=body,
            headers=headers,
        )
        if resp.status_code == 202 and "Location" in resp.headers:
            up.location = self._location(resp, "uploading a blob")
            up.offset = offset + n
        return resp.status_code

    def stream_patch(self, up: Upload, body: Iterator[bytes]) -> str | None:
        """Send `body` as one PATCH of unknown length (chunked transfer encoding) while
        it is still being produced. None once the registry took it; else why not: a
        stream is never replayed (no retry here), the caller uploads again from its copy.
        An exception raised by `body` (the blob was discarded) goes through."""
        limits = self.session.limits

        def paced() -> Iterator[bytes]:
            # The body comes at the conversion's pace, which is no fault of the registry:
            # the deadline starts again with each piece, so it bounds sending that piece,
            # and, after the last, the registry's answer.
            for piece in body:
                limits.restart()
                yield piece

        try:
            with self._bounded():
                resp = self._once(
                    "PATCH",
                    up.location,
                    "streaming a blob",
                    ok=lambda r: r.status_code in (202, 413),
                    content=paced(),
                    headers={"Content-Type": "application/octet-stream"},
                )
        except Retry as exc:
            return exc.reason
        except RegistryError as exc:
            return str(exc)
        if resp.status_code == 413:
            up.whole_refused = True
            return "refused whole (413)"
        if "Location" in resp.headers:
            try:
                up.location = self._location(resp, "streaming a blob")
            except RegistryError as exc:
                return str(exc)
        return None

    def finish_stream(self, up: Upload, digest: str) -> str | None:
        """PUT ?digest= after `stream_patch` (the registry checks the digest of what it
        received). None once committed, else why not (the caller uploads again)."""
        try:
            self._finish(up, digest)
        except Retry as exc:
            return exc.reason
        except RegistryError as exc:
            return str(exc)
        return None

    def _finish(self, up: Upload, digest: str) -> None:
        # Added to the Location's own query (its upload state), which `params=` would drop
        # (`_location` checked that it parses).
        url = str(httpx.URL(up.location).copy_add_param("digest", digest))
        self._once(
            "PUT",
            url,
            f"committing blob {digest}",
            ok=lambda r: r.status_code in (201, 204),
            headers={"Content-Length": "0"},
        )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def sniff_type(data: bytes) -> str | None:
    """The media type of a manifest or an index, told by its content (None: neither)."""
    try:
        raw = jsonlimits.loads_object(data, "manifest", max_size=MAX_MANIFEST_SIZE)
    except BadInputError:
        return None
    media_type = raw.get("mediaType")
    if isinstance(media_type, str) and media_type in d.INDEX_TYPES | d.MANIFEST_TYPES:
        return media_type
    if isinstance(raw.get("manifests"), list):
        return d.OCI_INDEX
    if isinstance(raw.get("config"), dict) and isinstance(raw.get("layers"), list):
        return d.OCI_MANIFEST
    return None
