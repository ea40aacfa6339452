"""Registry credentials, looked up the way skopeo and podman do (containers/image),
plus docker's global `credsStore`.

Order (containers-auth.json(5)): `--*-creds` (or none at all with `--src-no-creds`); then
`--authfile` or `REGISTRY_AUTH_FILE`, else the primary file,
`${XDG_RUNTIME_DIR}/containers/auth.json` or, with XDG_RUNTIME_DIR unset,
`/run/containers/$UID/auth.json` (where `podman login` and `skopeo login` write as root
under a plain sudo or in CI); then `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`;
then `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; then the legacy
`~/.dockercfg`. The first file that has an answer for the registry wins. Inside a file:
`credHelpers[host]`, then `auths` from the most specific key (`host/ns/repo`) to the
host, then `credsStore`.

Every lookup reads `RegistryOptions.env`, never os.environ, and every result says where
it came from so that an "unauthorized" error can name the source.
"""

from __future__ import annotations

import base64
import binascii
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estargz_opt import jsonlimits
from estargz_opt.errors import BadInputError, RegistryAccessError
from estargz_opt.stores.registry.options import RegistryOptions

#: The hosts that all mean Docker Hub, and the key `docker login` writes for it.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_LEGACY_KEY = "https://index.docker.io/v1/"
#: A helper's username that means "the secret is an identity (refresh) token".
IDENTITY_TOKEN_USER = "<token>"
#: How long a credential helper may take (it may talk to a keychain or a cloud API).
HELPER_TIMEOUT = 30.0
#: The primary auth file's directory when XDG_RUNTIME_DIR is unset: /run/containers/$UID
#: (containers-auth.json(5); containers/image's fallback on Linux).
RUN_CONTAINERS = Path("/run/containers")


@dataclass(frozen=True, slots=True)
class Credential:
    """A username with a password or an identity token; the secrets never print."""

    username: str
    password: str = field(repr=False)
    #: where it came from, e.g. "auth file /x/auth.json" (no secret in it)
    source: str
    #: an OAuth2 refresh token (`identitytoken`), exchanged at the token realm
    identity_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class _AuthFile:
    path: Path
    #: ~/.dockercfg: the file *is* the `auths` map
    legacy: bool = False


def parse_creds(value: str, source: str) -> Credential:
    """USER[:PASS] from `source` (RegistryOptions.creds_source); prompt-free, so a
    missing password is an error rather than a question."""
    user, sep, password = value.partition(":")
    if not user:
        raise RegistryAccessError(
            f"credentials from {source}: the user name is empty (expected USER:PASS)"
        )
    if not sep:
        raise RegistryAccessError(
            f"credentials from {source}: no password given for user {user!r} "
            "(expected USER:PASS; estargz-opt never prompts)"
        )
    return Credential(user, password, source)


def lookup(host: str, repository: str | None, opts: RegistryOptions) -> Credential | None:
    """The credential for `repository` (a path such as "ns/repo") on `host`, or None for
    anonymous access. `repository` None looks only at host-wide entries."""
    if opts.no_creds:
        return None
    if opts.creds is not None:
        return parse_creds(opts.creds, opts.creds_source)
    keys = list(_candidate_keys(host, repository))
    for auth_file in _auth_files(opts):
        found = _lookup_in_file(auth_file, host, keys, opts.env)
        if found is not None:
            return found
    return None


def searched(opts: RegistryOptions) -> list[Path]:
    """The auth files a lookup reads, in order (for the error that found nothing)."""
    if opts.no_creds or opts.creds is not None:
        return []
    return [f.path for f in _auth_files(opts)]


def _auth_files(opts: RegistryOptions) -> Iterator[_AuthFile]:
    """The files to read, in order. Without HOME in the environment the per-user
    places that hang off it are skipped (never guessed)."""
    env = opts.env
    home = Path(env["HOME"]) if env.get("HOME") else None

    def under(var: str, default: str) -> Path | None:
        return Path(env[var]) if env.get(var) else home / default if home else None

    named = opts.authfile or (
        Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE") else None
    )
    places: list[_AuthFile | None] = []
    # The override takes the primary file's place only (containers-auth.json(5)).
    if named is not None:
        places.append(_AuthFile(named))
    elif env.get("XDG_RUNTIME_DIR"):
        places.append(_AuthFile(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"))
    else:
        places.append(_AuthFile(RUN_CONTAINERS / str(os.getuid()) / "auth.json"))
    config_home = under("XDG_CONFIG_HOME", ".config")
    places.append(_AuthFile(config_home / "containers" / "auth.json") if config_home else None)
    docker_dir = under("DOCKER_CONFIG", ".docker")
    places.append(_AuthFile(docker_dir / "config.json") if docker_dir else None)
    places.append(_AuthFile(home / ".dockercfg", legacy=True) if home else None)
    yield from (p for p in places if p is not None)


def _candidate_keys(host: str, repository: str | None) -> Iterator[str]:
    """`auths` keys to try, most specific first: host/ns/repo, host/ns, host."""
    h = "docker.io" if host in DOCKER_HUB_HOSTS else host
    if repository:
        parts = repository.split("/")
        for n in range(len(parts), 0, -1):
            yield f"{h}/{'/'.join(parts[:n])}"
    yield h


def _normalize_key(key: str) -> str:
    """An `auths` key as a comparable host[/path]: URL-style keys (`https://host/v1/`,
    what old docker logins wrote) name only their host."""
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    key = key.rstrip("/")
    return "docker.io" if key in DOCKER_HUB_HOSTS else key


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryAccessError(f"auth file {path}: cannot be read ({e.strerror})") from None
    try:
        data = jsonlimits.loads(text, f"auth file {path}") if text.strip() else {}
    except BadInputError as e:
        raise RegistryAccessError(str(e)) from None
    if not isinstance(data, dict):
        raise RegistryAccessError(f"auth file {path}: not a JSON object")
    return data


def _lookup_in_file(
    auth_file: _AuthFile, host: str, keys: list[str], env: Mapping[str, str]
) -> Credential | None:
    data = _read_json(auth_file.path)
    if data is None:
        return None
    where = f"auth file {auth_file.path}"
    helpers = data.get("credHelpers") if not auth_file.legacy else None
    if isinstance(helpers, dict):
        for h in dict.fromkeys([host, *(k for k in keys if "/" not in k)]):
            if isinstance(helpers.get(h), str):
                return run_helper(helpers[h], host, env)
    auths = data if auth_file.legacy else data.get("auths")
    if isinstance(auths, dict):
        # normalized key -> (the key as the file writes it, its entry)
        normalized: dict[str, tuple[str, Any]] = {}
        for key, entry in auths.items():
            normalized.setdefault(_normalize_key(key), (key, entry))
        for key in keys:
            written, entry = normalized.get(_normalize_key(key), (key, None))
            if isinstance(entry, dict):
                cred = _from_entry(entry, f"{where} (key {written})", auth_file.path)
                if cred is not None:
                    return cred
    store = data.get("credsStore") if not auth_file.legacy else None
    if isinstance(store, str) and store:
        return run_helper(store, host, env)
    return None


def _from_entry(entry: Mapping[str, Any], source: str, path: Path) -> Credential | None:
    """An `auths` entry: `auth` (base64 user:pass) and/or `identitytoken`. An empty
    entry (what docker writes beside a `credsStore`) is no answer."""
    identity = entry.get("identitytoken") or None
    auth = entry.get("auth")
    user, password = "", ""
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryAccessError(
                f"auth file {path}: an `auth` value is not base64 of USER:PASS"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise RegistryAccessError(
                f"auth file {path}: an `auth` value has no ':' between user and password"
            )
    if not user and not isinstance(identity, str):
        return None
    return Credential(user, password, source, identity if isinstance(identity, str) else None)


def run_helper(name: str, host: str, env: Mapping[str, str]) -> Credential | None:
    """`docker-credential-NAME get`: the server on stdin, JSON on stdout. A helper that
    has nothing for the server ("credentials not found") is no answer, not an error."""
    program = f"docker-credential-{name}"
    source = f"credential helper {program}"
    try:
        server = DOCKER_HUB_LEGACY_KEY if host in DOCKER_HUB_HOSTS else host
        res = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            env=dict(env),
            timeout=HELPER_TIMEOUT,
            check=False,
            executable=_which(program, env),
        )
    except FileNotFoundError:
        raise RegistryAccessError(
            f"{source}: not found on PATH (named for {host} in an auth file)"
        ) from None
    except subprocess.TimeoutExpired:
        raise RegistryAccessError(
            f"{source}: no answer within {HELPER_TIMEOUT:.0f} s for {host}"
        ) from None
    out = res.stdout.decode(errors="replace").strip()
    if res.returncode != 0:
        if "credentials not found" in out.lower():
            return None
        # The helper's own message, first line only: it names no secret, it failed.
        first = (out or res.stderr.decode(errors="replace").strip()).splitlines()
        raise RegistryAccessError(
            f"{source} failed for {host} (exit {res.returncode}"
            f"{': ' + first[0][:200] if first else ''})"
        )
    try:
        data = jsonlimits.loads(out, source)
        user, secret = data["Username"], data["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (BadInputError, KeyError, TypeError):
        raise RegistryAccessError(
            f"{source}: its answer for {host} is not JSON with Username and Secret"
        ) from None
    if user == IDENTITY_TOKEN_USER:
        return Credential("", "", source, secret)
    return Credential(user, secret, source)


def _which(program: str, env: Mapping[str, str]) -> str:
    """The helper's path on the PATH of `env` (subprocess would search our own PATH)."""
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(d or ".") / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(program)
