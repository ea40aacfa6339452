"""The public Python API and the command line on top of it, in process.

No subprocess, no daemon, no root: an OCI layout made by the image factory is optimized
through `estargz_opt.optimize`, and the CLI is driven with click's CliRunner.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.imagefactory import blob_path, resolve_tag, simple_layer, write_layout

import estargz_opt as eo
from estargz_opt.cli import cli, main
from estargz_opt.cli.help import SECTIONS, SectionOption

pytestmark = pytest.mark.unit

FILES = {
    "etc/": None,
    "etc/app.conf": b"port=80\n" * 40,
    "usr/": None,
    "usr/bin/": None,
    "usr/bin/app": bytes(range(256)) * 300,
    "usr/lib/": None,
    "usr/lib/libunused.so": b"never read\n" * 500,
}
TOP = {"app/": None, "app/main.py": b"print('ready')\n", "app/data.bin": b"\0" * 5000}
PREFETCH = ["usr/bin/app", "etc/app.conf", "app/main.py"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    layout = tmp_path / "layout"
    write_layout(layout, "src", [simple_layer(FILES), simple_layer(TOP)])
    return layout


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything starts a process: the API runs in this one."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a subprocess was started: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)


def test_all_lists_the_api() -> None:
    for name in ("optimize", "analyze", "verify", "inspect", "convert_layer"):
        assert name in eo.__all__ and callable(getattr(eo, name))
    for name in eo.__all__:
        assert getattr(eo, name) is not None, name
    assert issubclass(eo.OptionsError, eo.UsageError)
    assert issubclass(eo.UsageError, eo.EstargzOptError)
    assert eo.__version__ == importlib.metadata.version("estargz-opt")


def test_optimize_with_a_prefetch_list(image: Path, tmp_path: Path, no_subprocess: None) -> None:
    plist = tmp_path / "list.txt"
    plist.write_text("\n".join(PREFETCH) + "\n")
    source = resolve_tag(image, "src")["digest"]
    request = eo.OptimizeRequest.from_options(
        f"oci:{image}:src",
        f"oci:{image}:esgz",
        oci=True,
        profiles=[eo.ProfileSource(eo.ProfileKind.PREFETCH_LIST, plist)],
        cache=False,
    )
    assert request.layer.level == eo.Format.ESTARGZ.default_level
    result = eo.optimize(request)

    assert isinstance(result, eo.OptimizeResult)
    assert result.format == "estargz"
    assert result.source_digest == source
    assert result.digest == resolve_tag(image, "esgz")["digest"] != source
    assert result.extra_image is None and result.analysis is None and result.warnings == []
    assert result.profile is not None
    assert (result.profile.files, result.profile.matched) == (3, 3)
    assert [lay.result.prioritized_files for lay in result.layers if lay.result] == [2, 1]
    for lay in result.layers:
        assert blob_path(image, lay.target.digest).stat().st_size == lay.target.size
        assert lay.cache == "off"
    assert result.report()["target"] == result.digest

    report = eo.verify(f"oci:{image}:esgz")
    assert isinstance(report, eo.ImageReport) and report.ok, report
    assert [c.prioritized for c in report.layers] == [
        ["usr/bin/app", "etc/app.conf"],
        ["app/main.py"],
    ]


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """The console script's main(), in process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["estargz-opt", *args])
    with pytest.raises(SystemExit) as info:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


class Recorder:
    """A ProgressListener that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def start(self, digest: str, total: int) -> None:
        self.calls.append(("start", digest))

    def update(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        pass

    def finish(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        self.calls.append(("finish", digest))

    def abandon(self, digest: str) -> None:
        self.calls.append(("abandon", digest))

    def cached(self, digest: str, size: int) -> None:
        self.calls.append(("cached", digest))

    def sampling(self, seconds_left: float | None, files: int) -> None:
        pass

    def workload_output(self) -> None:
        return None


def test_progress_listener_hears_each_layer_start_and_finish_once(image: Path) -> None:
    listener = Recorder()
    request = eo.OptimizeRequest.from_options(
        f"oci:{image}:src", f"oci:{image}:p", oci=True, no_optimize=True, cache=False
    )
    result = eo.optimize(request, listener)
    sources = sorted(lay.source.digest for lay in result.layers)
    for what in ("start", "finish"):
        assert sorted(d for kind, d in listener.calls if kind == what) == sources
    assert [kind for kind, _ in listener.calls if kind not in ("start", "finish")] == []


def test_option_errors_name_fields_and_the_cli_names_flags(
    image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(eo.OptionsError) as info:
        eo.OptimizeRequest.from_options(f"oci:{image}:src", f"oci:{image}:x", format="zstdchunked")
    assert str(info.value) == "format=zstdchunked requires oci=True"

    code, out, err = run_main(
        monkeypatch, capsys, "optimize", "--zstdchunked", f"oci:{image}:src", f"oci:{image}:x"
    )
    assert (code, out, err) == (2, "", "estargz-opt: error: --zstdchunked requires --oci\n")


def test_workload_option_errors_name_fields_and_the_cli_names_flags(
    image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(eo.BadInputError, match=r"^terminal requires stdin$"):
        eo.SamplerOptions(terminal=True).validate()
    code, _out, err = run_main(
        monkeypatch, capsys, "optimize", "--oci", "-t", f"oci:{image}:src", f"oci:{image}:x"
    )
    assert (code, err) == (2, "estargz-opt: error: -t/--terminal requires -i\n")


def test_an_empty_profile_names_the_flag_on_the_command_line(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plist = tmp_path / "none.txt"
    plist.write_text("not/in/the/image\n")
    request = eo.OptimizeRequest.from_options(
        f"oci:{image}:src",
        f"oci:{image}:x",
        profiles=[eo.ProfileSource(eo.ProfileKind.PREFETCH_LIST, plist)],
        cache=False,
    )
    with pytest.raises(eo.EmptyProfileError, match="allow_empty_profile=True converts anyway"):
        eo.optimize(request)
    args = ["optimize", "--prefetch-list", str(plist), "--no-cache"]
    refs = [f"oci:{image}:src", f"oci:{image}:x"]
    code, _out, err = run_main(monkeypatch, capsys, *args, *refs)
    assert code == 1 and err.endswith("(--allow-empty-profile converts anyway)\n"), err
    code, _out, err = run_main(monkeypatch, capsys, *args, "--allow-empty-profile", *refs)
    assert code == 0 and "converting without prioritized files (--allow-empty-profile)" in err


def test_from_options_owns_the_defaults(image: Path, tmp_path: Path) -> None:
    zstd = eo.OptimizeRequest.from_options(
        f"oci:{image}:src",
        f"oci:{image}:x",
        format=eo.Format.ZSTDCHUNKED,
        oci=True,
        min_chunk_size=1 << 16,
        no_optimize=True,
        cache_dir=tmp_path / "c",
        profiles=[eo.ProfileSource(eo.ProfileKind.RECORD, tmp_path / "unused.jsonl")],
    )
    # zstd:chunked has no min chunk size, and a record means nothing under no_optimize.
    assert (zstd.layer.level, zstd.layer.min_chunk_size, zstd.profiles) == (3, 0, ())
    assert zstd.cache_dir == tmp_path / "c"
    gz = eo.OptimizeRequest.from_options(f"oci:{image}:src", f"oci:{image}:x", cache=False)
    assert (gz.layer.level, gz.layer.chunk_size, gz.cache_dir) == (9, 4 << 20, None)


def test_convert_layer_writes_the_external_toc(tmp_path: Path) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(simple_layer(FILES))
    out = tmp_path / "out.blob"
    options = eo.LayerOptions(format=eo.Format.EXTERNAL_TOC, prioritized=("usr/bin/app", "nope"))
    done = eo.convert_layer(src, out, options)
    assert done.toc_file == tmp_path / "out.blob.toc" and done.toc_file.stat().st_size > 0
    assert done.layer.missing_prioritized == ["nope"] and done.layer.prioritized_files == 1
    assert out.stat().st_size == done.layer.size
    with pytest.raises(
        eo.OptionsError, match="toc_out applies to format=estargz-external-toc only"
    ):
        eo.convert_layer(src, tmp_path / "x", eo.LayerOptions(), toc_out=tmp_path / "t")
    assert not (tmp_path / "x").exists()


def cli_convert(image: Path, tag: str, *extra: str) -> str:
    """`optimize --no-optimize` of the test image to TAG through CliRunner: its stdout."""
    args = ["optimize", "--oci", "--no-optimize", "--no-cache", "-q", *extra]
    out = CliRunner().invoke(cli, [*args, f"oci:{image}:src", f"oci:{image}:{tag}"])
    assert out.exit_code == 0, out.output
    return out.stdout


def test_cli_optimize_prints_the_digest(image: Path) -> None:
    assert cli_convert(image, "o").strip() == resolve_tag(image, "o")["digest"]


def test_cli_version_is_the_package_version() -> None:
    out = CliRunner().invoke(cli, ["--version"])
    assert out.stdout.strip() == f"estargz-opt, version {importlib.metadata.version('estargz-opt')}"


@pytest.mark.parametrize("command", ["optimize", "analyze", "verify", "inspect"])
def test_every_option_has_a_section_and_a_help_line(command: str) -> None:
    cmd = cli.commands[command]
    assert isinstance(cmd, click.Command)
    options = [p for p in cmd.params if isinstance(p, click.Option)]
    assert options
    for p in options:
        assert isinstance(p, SectionOption), p.opts
        assert p.help and p.help.strip(), p.opts


def test_optimize_help_shows_the_sections_in_order_with_defaults() -> None:
    out = CliRunner().invoke(cli, ["optimize", "--help"], terminal_width=200)
    assert out.exit_code == 0
    heads = [
        line[: -len(" options:")] for line in out.stdout.splitlines() if line.endswith(" options:")
    ]
    assert heads == [*SECTIONS, "Other"]
    for shown in (
        "[default: (3; 7 with",
        "[default: 9]",
        "[default: 10G]",
        "[default: 10]",
        "[default: runc]",
    ):
        assert shown in out.stdout, shown
    assert "[containerd|runc|rootless]" in out.stdout  # no empty choice


def test_json_report_is_the_result_report(image: Path) -> None:
    report = json.loads(cli_convert(image, "j", "--json"))
    assert report["target"] == resolve_tag(image, "j")["digest"]
    assert [lay["format"] for lay in report["layers"]] == ["estargz", "estargz"]


def test_every_option_term_the_library_names_has_a_flag() -> None:
    """Each term an error or log line of the library names an option by (a keyword given
    to with_terms or OptionsError, or a module constant it passes) is spelled as a flag
    by the command line: no message shows a field name to a CLI user."""
    from estargz_opt.cli.main import _spell

    src = Path(eo.__file__).parent
    terms: set[str] = set()
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if "cli" in parts or "__main__" in parts:
            continue
        module = importlib.import_module(".".join(p for p in parts if p != "__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(getattr(node, "func", None), "attr", None)
            name = name or getattr(getattr(node, "func", None), "id", None)
            if not isinstance(node, ast.Call) or name not in ("with_terms", "OptionsError"):
                continue
            for kw in node.keywords:
                value = kw.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    terms.add(value.value)
                elif isinstance(value, ast.Name) and hasattr(module, value.id):
                    found = getattr(module, value.id)
                    if isinstance(found, str):
                        terms.add(found)
                elif isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name):
                    terms.update(getattr(module, value.value.id).values())
    terms -= {"reason"}  # a template's free text, not an option
    terms |= {"platforms", "all_platforms", "allow_empty_profile=True"}  # log arguments
    assert {"format=zstdchunked", "profiles=record", "terminal", "stdin"} <= terms, terms
    unspelled = sorted(t for t in terms if not _spell(t).startswith("-"))
    assert unspelled == [], unspelled
