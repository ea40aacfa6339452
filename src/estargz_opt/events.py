"""What a run tells its caller while it works: the progress callback protocol.

The library never draws anything. `optimize`, `analyze` and `convert_layer` call a
`ProgressListener` the caller passes (or nothing); the command line's status line is one
implementation (estargz_opt.cli.progress), a build system's log or a service's metrics
can be others.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol


class ProgressListener(Protocol):
    """Receives a run's progress. Layer methods are called from the converting threads,
    several layers at a time, so an implementation must be thread-safe."""

    def start(self, digest: str, total: int) -> None:
        """The layer `digest` (of the source) starts converting: `total` bytes of tar."""

    def update(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        """So far: tar bytes read, blob bytes written."""

    def finish(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        """The layer is converted and stored: the whole tar (bytes_in) went in, bytes_out
        came out. Only a layer that got this far is finished."""

    def abandon(self, digest: str) -> None:
        """The layer's conversion stopped (an error, an interrupt): called instead of
        finish(), never after it."""

    def cached(self, digest: str, size: int) -> None:
        """The layer was taken from the converted-layer cache: nothing was converted."""

    def sampling(self, seconds_left: float | None, files: int) -> None:
        """The workload run: seconds left (None: no time limit; 0: the run is over) and
        the file accesses seen so far."""

    def workload_output(self) -> BinaryIO | None:
        """Where the workload's own output goes (None: stderr)."""
