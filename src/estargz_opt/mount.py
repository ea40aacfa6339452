"""A mount in mount(8) terms, as snapshotters return it and runtimes take it.

A leaf (standard library only): the containerd client returns it, the runners hand it
to the file-access monitor, and the privileged monitor helper mounts it without loading
grpc or any store.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount: filesystem type, source, target (relative to where it is applied) and
    mount(8) options ("ro", "bind", "lowerdir=…", …)."""

    type: str
    source: str
    target: str = ""
    options: list[str] = field(default_factory=list)
