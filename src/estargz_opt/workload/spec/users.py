"""The process user: "user[:group]" resolved against the image's /etc/passwd and /etc/group."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from estargz_opt.errors import BadInputError
from estargz_opt.workload.spec.rootfs import read_rootfs_file

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Passwd:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def _entries(
    rootfs: str, path: str, min_fields: int, parse: Callable[[list[str]], _T]
) -> list[_T] | None:
    """The entries of an /etc database: its colon-separated lines with at least
    `min_fields` fields, comments and lines with a non-numeric id skipped; None when the
    image has no such file."""
    text = read_rootfs_file(rootfs, path)
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < min_fields or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            out.append(parse(fields))
    return out


def _passwd_entries(rootfs: str) -> list[_Passwd] | None:
    return _entries(rootfs, "/etc/passwd", 4, lambda f: _Passwd(f[0], int(f[2]), int(f[3])))


def _group(f: list[str]) -> _Group:
    members = tuple(m for m in (f[3] if len(f) > 3 else "").split(",") if m)
    return _Group(f[0], int(f[2]), members)


def _group_entries(rootfs: str) -> list[_Group] | None:
    return _entries(rootfs, "/etc/group", 3, _group)


def _as_id(text: str) -> int | None:
    if text.isdigit():
        v = int(text)
        if v < 2**32:
            return v
    return None


def resolve_user(rootfs: str, userstr: str) -> dict[str, Any]:
    """containerd's `WithUser` + `WithAdditionalGIDs`: "user[:group]" → the spec's
    process.user. Numbers map directly; names are looked up in the image's /etc/passwd
    and /etc/group. The primary gid and the user's supplementary groups form
    additionalGids."""
    user_part, sep, group_part = userstr.partition(":")
    if sep and not group_part:
        raise BadInputError(f"invalid user {userstr!r}: the group is empty")
    passwd: list[_Passwd] | None = None
    uid = _as_id(user_part) if user_part else 0
    username: str | None = None
    gid: int | None = None
    if uid is None:
        passwd = _passwd_entries(rootfs)
        match = [p for p in passwd or [] if p.name == user_part]
        if not match:
            raise BadInputError(f"user {user_part!r} is not in the image's /etc/passwd")
        uid, gid, username = match[0].uid, match[0].gid, match[0].name
    if sep:
        gid = _as_id(group_part)
        if gid is None:
            groups = _group_entries(rootfs)
            gmatch = [g for g in groups or [] if g.name == group_part]
            if not gmatch:
                raise BadInputError(f"group {group_part!r} is not in the image's /etc/group")
            gid = gmatch[0].gid
    if gid is None or username is None:
        if passwd is None:
            passwd = _passwd_entries(rootfs)
        byuid = [p for p in passwd or [] if p.uid == uid]
        if byuid:
            username = byuid[0].name
            if gid is None:
                gid = byuid[0].gid
    if gid is None:
        gid = 0
    additional = [gid]
    if username is not None:
        for g in _group_entries(rootfs) or []:
            if username in g.members and g.gid not in additional:
                additional.append(g.gid)
    return {"uid": uid, "gid": gid, "additionalGids": additional}
