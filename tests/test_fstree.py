"""fstree: walks and removals of trees deeper than the recursion limit and PATH_MAX,
never following a symlink, and stopping when a directory is moved under them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from estargz_opt import fstree

pytestmark = pytest.mark.unit

DEPTH = 1_100
NAME = "d" * 200  # 1,100 levels of these: about 220,000 characters, far past PATH_MAX


def _deep(top: Path, depth: int = DEPTH) -> None:
    """A chain of `depth` directories under `top`, each holding a 3-byte file."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(f, b"abc")
            os.close(f)
            os.mkdir(NAME, dir_fd=fd)
            sub = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def test_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    assert sys.getrecursionlimit() < DEPTH
    top = tmp_path / "deep"
    _deep(top)
    entries = list(fstree.walk(str(top)))
    assert len(entries) == 2 * DEPTH
    assert max(len(e.path) for e in entries) > 4096 * 50
    assert sum(1 for e in entries if e.name == "f") == DEPTH
    assert fstree.tree_size(str(top)) >= DEPTH * 4096  # every file takes a block here
    fstree.remove_tree(str(top))
    assert not top.exists()
    fstree.remove_tree(str(top))  # a missing tree is fine


def test_walk_order_symlinks_and_hard_links(tmp_path: Path) -> None:
    top = tmp_path / "t"
    (top / "b" / "c").mkdir(parents=True)
    (top / "a").write_text("a")
    (top / "b" / "c" / "x").write_text("x")
    os.link(top / "a", top / "b" / "hard")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (top / "link").symlink_to(outside)
    paths = [e.path for e in fstree.walk(str(top), sort=True)]
    assert paths == ["a", "b", "b/c", "b/c/x", "b/hard", "link"]  # pre-order, by name
    assert fstree.tree_size(str(top)) == sum(
        os.lstat(top / p).st_blocks * 512 for p in ("b", "b/c", "b/c/x", "a", "link"))
    fstree.remove_tree(str(top))
    assert not top.exists() and (outside / "keep").read_text() == "keep"


def test_a_symlink_at_the_top_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        list(fstree.walk(str(link)))
    fstree.remove_tree(str(link))  # the link goes, not what it points to
    assert not link.is_symlink() and (target / "keep").exists()


def test_a_directory_moved_during_the_walk_stops_it(tmp_path: Path) -> None:
    top = tmp_path / "t"
    (top / "a" / "b").mkdir(parents=True)
    (top / "z").mkdir()
    walk = fstree.walk(str(top), sort=True)
    assert next(walk).path == "a"
    assert next(walk).path == "a/b"
    (top / "a").rename(tmp_path / "moved")  # "a/b/.." is no longer the "a" under top
    with pytest.raises(OSError, match="moved"):
        list(walk)
