"""What a workload sees of a file tree, as data a test can compare between two unpackers."""

from __future__ import annotations

import hashlib
import os
import stat


def tree_print(root: str) -> dict[str, list[object]]:
    """Everything a workload sees of each path under root (atime and ctime aside)."""
    out: dict[str, list[object]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            kind = stat.S_IFMT(st.st_mode)
            row: list[object] = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if not stat.S_ISDIR(st.st_mode):
                row.append(st.st_mtime_ns)  # a merged overlay directory has its own
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    row += [hashlib.sha256(fh.read()).hexdigest(), st.st_nlink]
            elif stat.S_ISLNK(st.st_mode):
                row.append(os.readlink(p))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                row.append([os.major(st.st_rdev), os.minor(st.st_rdev)])
            if not stat.S_ISLNK(st.st_mode):
                row.append(
                    sorted(
                        (k, os.getxattr(p, k, follow_symlinks=False).hex())
                        for k in os.listxattr(p, follow_symlinks=False)
                        if k.startswith("user.")
                    )
                )
            out[rel] = row
    return out
