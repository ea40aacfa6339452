"""Where registry credentials come from, looked up in process: the auth files in
containers-auth.json(5)'s order then docker's, the most specific key first, the command
line over every file, credential helpers, and one-line errors that name the file and
never the secret. test_registry_auth.py sends what is found to real registries."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from estargz_opt.errors import RegistryAccessError
from estargz_opt.stores.registry.credentials import Credential, lookup, parse_creds
from estargz_opt.stores.registry.options import RegistryOptions

pytestmark = pytest.mark.unit

HOST = "registry.example:5000"


def auth(user: str, password: str = "s3cret") -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def write(path: Path, auths: dict[str, object], **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with every per-user place under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "PATH": str(tmp_path / "bin")}


def found(env: dict[str, str], repo: str | None = "team/app", **opts: object
          ) -> Credential | None:
    return lookup(HOST, repo, RegistryOptions(env=env, **opts))  # type: ignore[arg-type]


def user(env: dict[str, str], repo: str | None = "team/app", **opts: object) -> str:
    """The user name of the credential found (the test fails if none is)."""
    cred = found(env, repo, **opts)
    assert cred is not None, "no credential found"
    return cred.username


def test_auth_files_in_order(env: dict[str, str]) -> None:
    """$XDG_RUNTIME_DIR/containers/auth.json, then ~/.config/containers/auth.json (or
    $XDG_CONFIG_HOME's), then ~/.docker/config.json (or $DOCKER_CONFIG's), then
    ~/.dockercfg: the first file with an answer wins."""
    home = Path(env["HOME"])
    files = [
        write(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", {HOST: auth("run")}),
        write(home / ".config" / "containers" / "auth.json", {HOST: auth("config")}),
        write(home / ".docker" / "config.json", {HOST: auth("docker")}),
    ]
    legacy = home / ".dockercfg"
    legacy.write_text(json.dumps({HOST: auth("dockercfg")}))
    for path, user in zip(files, ["run", "config", "docker"], strict=True):
        cred = found(env)
        assert cred is not None and (cred.username, cred.password) == (user, "s3cret")
        assert cred.source == f"auth file {path} (key {HOST})"
        path.unlink()
    cred = found(env)
    assert cred is not None and cred.username == "dockercfg"
    legacy.unlink()
    assert found(env) is None


def test_variables_move_the_per_user_files(env: dict[str, str], tmp_path: Path) -> None:
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), DOCKER_CONFIG=str(tmp_path / "dc"))
    write(Path(env["HOME"]) / ".config" / "containers" / "auth.json", {HOST: auth("ignored")})
    write(tmp_path / "dc" / "config.json", {HOST: auth("dc")})
    assert user(env) == "dc"
    write(tmp_path / "xdg" / "containers" / "auth.json", {HOST: auth("xdg")})
    assert user(env) == "xdg"


def test_a_named_auth_file_replaces_the_containers_ones(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    """REGISTRY_AUTH_FILE or --authfile stands for the containers files; docker's are
    still read after it."""
    write(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", {HOST: auth("run")})
    named = write(tmp_path / "named.json", {"other.example": auth("elsewhere")})
    write(Path(env["HOME"]) / ".docker" / "config.json", {HOST: auth("docker")})
    assert user({**env, "REGISTRY_AUTH_FILE": str(named)}) == "docker"
    assert user(env, authfile=named) == "docker"
    write(named, {HOST: auth("named")})
    assert user(env, authfile=named) == "named"


def test_most_specific_key_first(env: dict[str, str]) -> None:
    path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    write(path, {HOST: auth("host"), f"{HOST}/team": auth("ns"),
                 f"{HOST}/team/app": auth("repo")})
    assert user(env, "team/app") == "repo"
    assert user(env, "team/other") == "ns"
    assert user(env, "solo") == "host"
    assert user(env, None) == "host"


def test_docker_hub_keys_in_any_spelling(env: dict[str, str]) -> None:
    write(Path(env["HOME"]) / ".docker" / "config.json",
          {"https://index.docker.io/v1/": auth("hub")})
    for host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        cred = lookup(host, "library/alpine", RegistryOptions(env=env))
        assert cred is not None and cred.username == "hub", host


def test_the_command_line_wins_and_no_creds_is_anonymous(env: dict[str, str]) -> None:
    write(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", {HOST: auth("file")})
    cred = found(env, creds="cli:pw", creds_source="the command line (--src-creds)")
    assert cred == Credential("cli", "pw", "the command line (--src-creds)")
    assert found(env, no_creds=True) is None


@pytest.mark.parametrize(("value", "words"), [
    ("user", "no password given for user 'user'"),
    (":pw", "the user name is empty"),
])
def test_incomplete_command_line_creds(value: str, words: str) -> None:
    with pytest.raises(RegistryAccessError) as err:
        parse_creds(value, "the command line (--dest-creds)")
    assert str(err.value).startswith("credentials from the command line (--dest-creds): ")
    assert words in str(err.value)


def test_identity_token_entry(env: dict[str, str]) -> None:
    write(Path(env["HOME"]) / ".docker" / "config.json", {HOST: {"identitytoken": "rt-1"}})
    cred = found(env)
    assert cred is not None and cred.username == "" and cred.identity_token == "rt-1"


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"auths": {HOST: {"auth": "!!!"}}}), "not base64 of USER:PASS"),
    (json.dumps({"auths": {HOST: {"auth": base64.b64encode(b"nocolon").decode()}}}),
     "has no ':' between user and password"),
])
def test_a_bad_auth_file_is_one_line_naming_it(env: dict[str, str], content: str,
                                               words: str) -> None:
    path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RegistryAccessError) as err:
        found(env)
    assert str(err.value).startswith(f"auth file {path}: ") and words in str(err.value)
    assert "\n" not in str(err.value) and "nocolon" not in str(err.value)


def helper(env: dict[str, str], name: str, script: str) -> None:
    bin_dir = Path(env["PATH"])
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_credential_helper_for_the_host_then_the_store(env: dict[str, str]) -> None:
    helper(env, "pass", 'read server; printf \'{"Username":"h-%s","Secret":"x"}\' "$server"\n')
    helper(env, "none", 'echo "credentials not found in native keychain"; exit 1\n')
    path = Path(env["HOME"]) / ".docker" / "config.json"
    write(path, {}, credHelpers={HOST: "pass"})
    cred = found(env)
    assert cred is not None and cred.username == f"h-{HOST}"
    assert cred.source == "credential helper docker-credential-pass"
    write(path, {}, credsStore="none")
    assert found(env) is None  # "not found" is no answer, not an error


def test_a_failing_helper_is_one_line_without_its_output_beyond_it(env: dict[str, str]) -> None:
    helper(env, "broken", 'echo "vault sealed"; echo "token=abc"; exit 3\n')
    write(Path(env["HOME"]) / ".docker" / "config.json", {}, credsStore="broken")
    with pytest.raises(RegistryAccessError) as err:
        found(env)
    assert str(err.value) == (f"credential helper docker-credential-broken failed for {HOST} "
                              "(exit 3: vault sealed)")


def test_secrets_do_not_print() -> None:
    cred = Credential("u", "hunter2", "somewhere", identity_token="rt-secret")
    assert "hunter2" not in repr(cred) and "rt-secret" not in repr(cred)
