"""The CLI's exit codes and messages, in process (click's CliRunner around the real entry
point): 0 and output for help and version, 2 and one line for a command line that cannot
work, 1 and one line for input that fails, and nothing written in either case."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import error_message, invoke
from support.imagefactory import simple_layer, write_layout

pytestmark = pytest.mark.unit


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    write_layout(path, "v1", [simple_layer({"etc/app.conf": b"x\n"})])
    return path


@pytest.mark.parametrize("args", [["--help"], ["optimize", "--help"], ["layer", "--help"],
                                  ["layer", "convert", "--help"], ["cache", "--help"]])
def test_help_exits_0_on_stdout(args: list[str]) -> None:
    res = invoke(*args)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: estargz-opt ")


def test_version() -> None:
    res = invoke("--version")
    assert res.returncode == 0 and res.stdout.startswith("estargz-opt, version ")


@pytest.mark.parametrize(("args", "words"), [
    (["optimize", "--no-such-flag", "a", "b"], "No such option '--no-such-flag'"),
    (["optimize", "oci:/x:1"], "Missing argument"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["optimize", "--period", "soon", "oci:/x:1", "oci:/y:1"],
     "Invalid value for '--period': 'soon'"),
    (["layer", "convert", "/nonexistent/src.tar", "/tmp/out"], "does not exist"),
])
def test_click_usage_errors_exit_2_in_one_line(args: list[str], words: str) -> None:
    res = invoke(*args)
    assert res.returncode == 2
    assert words in error_message(res)


@pytest.mark.parametrize(("flags", "words"), [
    (["--zstdchunked"], "--zstdchunked requires --oci"),
    (["--oci", "--zstdchunked", "--estargz-external-toc"], "do not go together"),
    (["--oci", "--estargz-external-toc", "--reuse"], "cannot be combined with --reuse"),
    (["--oci", "--no-optimize", "--prefetch-list", "{lst}"], "--prefetch-list cannot be"),
    (["--oci", "--no-optimize", "--record-out", "{tmp}/r.json"], "--record-out records"),
    (["--oci", "--no-optimize", "--allow-empty-profile"], "--allow-empty-profile applies"),
    (["--oci", "--rootless", "--runner", "runc"], "--rootless contradicts --runner runc"),
])
def test_options_that_do_not_combine_exit_2_and_write_nothing(
        flags: list[str], words: str, layout: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("etc/app.conf\n")
    dst = tmp_path / "dst"
    argv = [f.format(lst=lst, tmp=tmp_path) for f in flags]
    res = invoke("optimize", *argv, f"oci:{layout}:v1", f"oci:{dst}:v1")
    assert res.returncode == 2, res
    assert words in error_message(res)
    assert not dst.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("src", "dst", "code", "words"), [
    ("ftp://h/x", "oci:{tmp}/d:1", 2, "unknown transport 'ftp://'"),
    ("oci:{layout}:v1", "docker://h.example/a@sha256:" + "0" * 64, 2, "names a digest"),
    ("oci:{layout}:v1", "docker-archive:{tmp}/d.tar", 2, "read only"),
    ("oci:{layout}:nosuchtag", "oci:{tmp}/d:1", 1, "nosuchtag"),
    ("oci:{tmp}/missing:v1", "oci:{tmp}/d:1", 1, "missing"),
])
def test_bad_references_and_missing_images(src: str, dst: str, code: int, words: str,
                                           layout: Path, tmp_path: Path) -> None:
    res = invoke("optimize", "--oci", "--no-optimize", src.format(layout=layout, tmp=tmp_path),
                 dst.format(tmp=tmp_path))
    assert res.returncode == code, res
    assert words in error_message(res)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.tar").exists()


def test_layer_convert_of_something_that_is_not_a_layer(tmp_path: Path) -> None:
    src = tmp_path / "notes.txt"
    src.write_text("not a tar\n" * 100)
    out = tmp_path / "out.esgz"
    res = invoke("layer", "convert", src, out)
    assert res.returncode == 1
    error_message(res)
    assert not out.exists()


def test_success_prints_the_digest_last(layout: Path, tmp_path: Path) -> None:
    res = invoke("optimize", "--oci", "--no-optimize", f"oci:{layout}:v1",
                 f"oci:{tmp_path / 'dst'}:v1")
    assert res.returncode == 0, res
    assert res.stdout.strip().splitlines()[-1].startswith("sha256:")


def test_an_in_process_run_leaves_the_test_process_as_it_was() -> None:
    """What main() sets for its process (signal handlers, log levels and handlers) is put
    back by invoke: a failed run ignores SIGINT, which children would inherit."""
    import logging
    import signal

    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    logs = (root.level, root.handlers[:], httpx_logger.level)
    assert invoke("optimize", "--zstdchunked", "oci:/x:1", "oci:/y:1").returncode == 2
    assert invoke("--log-format", "json", "--version").returncode == 0
    assert {s: signal.getsignal(s) for s in signals} == signals
    assert (root.level, root.handlers[:], httpx_logger.level) == logs
