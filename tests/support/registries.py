"""Test registries in four configurations, for tests/test_registry_auth.py
(and the registry store's tests):

* plain HTTP;
* TLS with a test CA (:class:`LoopbackCA`), the CA found through a certs.d directory;
* htpasswd basic auth over TLS (bcrypt hashes, as distribution requires);
* token auth over TLS against :class:`TokenIssuer`, a small HTTP token server that checks
  basic credentials and signs RS256 JWTs with a test key. The token header carries the
  signing certificate as ``x5c``; distribution 2.8 verifies that chain against its
  ``rootcertbundle`` and then checks ``iss``, ``aud``, ``exp``/``nbf`` and ``access``.

Everything lives in one temporary directory and is stopped by :meth:`Registries.stop`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from support.lazypull import Registry, RegistryConfig

USER = "tester"
PASSWORD = "s3cret-Pa55word-9f1c"
SERVICE = "estargz-opt-test-registry"
ISSUER = "estargz-opt-test-issuer"
#: distribution's allowance for clock skew on a token's exp and nbf
#: (registry/auth/token: Leeway)
LEEWAY = 60


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name, issuer_key: rsa.RSAPrivateKey,
          ca: bool, sans: list[x509.GeneralName] | None = None,
          client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class LoopbackCA:
    """A CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_crt(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @classmethod
    def create(cls, d: Path) -> LoopbackCA:
        d.mkdir(parents=True, exist_ok=True)
        ca_key, srv_key = _key(), _key()
        ca = _cert("estargz-opt test CA", ca_key, _name("estargz-opt test CA"), ca_key, True)
        srv = _cert("127.0.0.1", srv_key, ca.subject, ca_key, False,
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                     x509.DNSName("localhost")])
        self = cls(d)
        self.ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_crt.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
        self.server_key.write_bytes(_pem_key(srv_key))
        self.ca_key.write_bytes(_pem_key(ca_key))
        return self

    def client_pair(self, d: Path, name: str = "client") -> tuple[Path, Path]:
        """A client certificate signed by this CA, as certs.d wants it: ``NAME.cert`` and
        ``NAME.key`` in `d`."""
        d.mkdir(parents=True, exist_ok=True)
        ca_cert = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        key = _key()
        cert = _cert(f"estargz-opt test client {name}", key, ca_cert.subject, ca_key, False,
                     client=True)
        pem, key_pem = d / f"{name}.cert", d / f"{name}.key"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_pem.write_bytes(_pem_key(key))
        return pem, key_pem

    def certs_d(self, base: Path, host: str) -> Path:
        """A certs.d directory for `host` under `base` holding the CA as ``ca.crt``."""
        d = base / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.crt").write_bytes(self.ca_crt.read_bytes())
        return d


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    """What the issuer was asked: the user (None when anonymous) and the scopes."""

    user: str | None
    scopes: list[str]
    service: str | None
    #: "basic" (GET with a password) or "refresh_token" (the OAuth2 POST)
    grant: str = "basic"
    #: the OAuth2 POST's client_id
    client_id: str | None = None


@dataclass
class TokenIssuer:
    """An HTTP token server: GET /token?service=…&scope=… with basic credentials."""

    dir: Path
    users: dict[str, str] = field(default_factory=lambda: {USER: PASSWORD})
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    #: the next this many tokens are already expired (the registry then answers 401)
    expired_next: int = 0
    #: seconds each token lives: its `expires_in`, and when the registry stops taking it
    lifetime: int = 300
    #: identity (refresh) tokens accepted by the OAuth2 POST, and the user each means
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    #: the Authorization header of every GET ("" for none)
    authorization_seen: list[str] = field(default_factory=list)
    #: repositories no user gets any access to (the token is issued without it)
    denied: set[str] = field(default_factory=set)
    #: repositories every user may pull from but not push to
    read_only: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _key: rsa.RSAPrivateKey = field(default_factory=_key, repr=False)

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    @property
    def bundle(self) -> Path:
        return self.dir / "token-signer.crt"

    @property
    def auth_config(self) -> str:
        """The registry config's `auth:` body that trusts this issuer's tokens."""
        return (f"  token:\n    realm: {self.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.bundle}\n")

    def start(self) -> TokenIssuer:
        self.dir.mkdir(parents=True, exist_ok=True)
        signer = _cert("token signer", self._key, _name("token signer"), self._key, False)
        self._der = signer.public_bytes(serialization.Encoding.DER)
        self.bundle.write_bytes(signer.public_bytes(serialization.Encoding.PEM))
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer._answer(self)

            def do_POST(self) -> None:
                issuer._answer_refresh(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        q = parse_qs(urlsplit(h.path).query)
        user = None
        auth = h.headers.get("Authorization", "")
        self.authorization_seen.append(auth)
        if auth.startswith("Basic "):
            u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(u) != p:
                self._send(h, 401, {"errors": [{"code": "UNAUTHORIZED"}]})
                return
            user = u
        scopes = q.get("scope", [])
        self.requests.append(TokenRequest(user, scopes, (q.get("service") or [None])[0]))
        if user is None:
            self._send(h, 401, {"errors": [{"code": "UNAUTHORIZED"}]})
            return
        token = self.sign(user, scopes, expired=self.expired_next > 0)
        self.expired_next = max(0, self.expired_next - 1)
        self.issued.append(token)
        self._send(h, 200, {"token": token, "expires_in": self.lifetime,
                            "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})

    def _answer_refresh(self, h: BaseHTTPRequestHandler) -> None:
        """The OAuth2 form POST: grant_type=refresh_token with an identity token."""
        length = int(h.headers.get("Content-Length", "0"))
        form = parse_qs(h.rfile.read(length).decode())
        scopes = " ".join(form.get("scope", [])).split()
        user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
        self.requests.append(TokenRequest(user, scopes, (form.get("service") or [None])[0],
                                          (form.get("grant_type") or [""])[0],
                                          (form.get("client_id") or [None])[0]))
        if (form.get("grant_type") or [""])[0] != "refresh_token" or user is None:
            self._send(h, 401, {"error": "invalid_grant"})
            return
        token = self.sign(user, scopes)
        self.issued.append(token)
        self._send(h, 200, {"access_token": token, "expires_in": self.lifetime})

    def sign(self, user: str, scopes: list[str], expired: bool = False) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if name in self.denied:
                continue
            granted = [a for a in actions.split(",")
                       if not (name in self.read_only and a == "push")]
            access.append({"type": kind, "name": name, "actions": granted})
        # JWT times are whole seconds: round up, so the token lives at least `lifetime`.
        # distribution accepts a token until LEEWAY after its `exp` (clock skew), so
        # `exp` is set that much earlier: the registry refuses the token `lifetime`
        # seconds after it was issued, as `expires_in` said.
        now = math.ceil(time.time()) - (3600 if expired else 0)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + self.lifetime - LEEWAY,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
        for u, p in users.items()))
    return path


@dataclass
class Registries:
    """The four configurations, started together (one CA, one token issuer)."""

    dir: Path
    ca: LoopbackCA
    issuer: TokenIssuer
    plain: Registry
    tls: Registry
    basic: Registry
    token: Registry

    @classmethod
    def start(cls, d: Path) -> Registries:
        ca = LoopbackCA.create(d / "ca")
        issuer = TokenIssuer(d / "issuer").start()
        tls = RegistryConfig(tls_cert=ca.server_crt, tls_key=ca.server_key, ca=ca.ca_crt)
        started: list[Registry] = []
        try:
            for config in (
                    RegistryConfig(),
                    tls,
                    RegistryConfig(tls.tls_cert, tls.tls_key, tls.ca,
                                   "  htpasswd:\n    realm: estargz-opt-test\n"
                                   f"    path: {htpasswd(d / 'htpasswd', {USER: PASSWORD})}\n"),
                    RegistryConfig(tls.tls_cert, tls.tls_key, tls.ca, issuer.auth_config)):
                started.append(Registry.start(d, config))
        except BaseException:
            for r in started:
                r.stop()
            issuer.stop()
            raise
        return cls(d, ca, issuer, *started)

    def all(self) -> dict[str, Registry]:
        return {"plain": self.plain, "tls": self.tls, "basic": self.basic, "token": self.token}

    def stop(self) -> None:
        for r in self.all().values():
            with contextlib.suppress(Exception):
                r.stop()
        self.issuer.stop()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
