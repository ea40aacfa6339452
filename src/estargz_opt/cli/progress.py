"""Per-layer progress on stderr: a live status line on a terminal, periodic log lines elsewhere.

The command line's ProgressListener (estargz_opt.events). Stdout stays untouched (it
carries the digest or the JSON report), so progress can never garble what a pipeline
reads.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, TextIO, cast

log = logging.getLogger("estargz_opt")
_LOG_EVERY = 5.0
_DRAW_EVERY = 0.2


@dataclass(slots=True)
class _Layer:
    digest: str
    total: int
    started: float
    bytes_in: int = 0
    bytes_out: int = 0
    last_log: float = 0.0


class Progress:
    """Receives (digest, bytes in, bytes out) from converting threads and shows it (a
    ProgressListener)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty() if live is None else live
        self._layers: dict[str, _Layer] = {}
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._drawn = False
        self._last_sample_log = 0.0

    def start(self, digest: str, total: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._live and not self._layers:
                self._clear()  # the analysis countdown, if any
            self._layers[digest] = _Layer(digest, total, now, last_log=now)
        if not self._live:
            log.info(
                "converting layer %s (%s of tar)", digest, _size(total), extra={"layer": digest}
            )

    def update(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            layer = self._layers.get(digest)
            if layer is None:
                return
            layer.bytes_in, layer.bytes_out = bytes_in, bytes_out
            now = time.monotonic()
            if self._live:
                if now - self._last_draw >= _DRAW_EVERY:
                    self._last_draw = now
                    self._draw()
            elif now - layer.last_log >= _LOG_EVERY:
                layer.last_log = now
                log.info("layer %s: %s", digest, _describe(layer, now), extra={"layer": digest})

    def finish(self, digest: str, bytes_in: int, bytes_out: int) -> None:
        """The layer is converted and stored: the whole tar (bytes_in) went in, bytes_out
        came out. Only a layer that got this far is reported as done."""
        with self._lock:
            layer = self._layers.pop(digest, None)
            if layer is None:
                return
            now = time.monotonic()
            if self._live:
                self._clear()
            log.info(
                "layer %s done: %s of tar in, %s out in %.1f s",
                digest,
                _size(bytes_in),
                _size(bytes_out),
                now - layer.started,
                extra={"layer": digest},
            )
            if self._live and self._layers:
                self._draw()

    def abandon(self, digest: str) -> None:
        """The layer's conversion stopped (an error, Ctrl-C): it leaves the display with no
        line of its own, the error says why. Nothing happens after finish()."""
        with self._lock:
            if self._layers.pop(digest, None) is None:
                return
            if self._live:
                self._clear()
                if self._layers:
                    self._draw()

    def cached(self, digest: str, size: int) -> None:
        """A layer taken from the layer cache: nothing was converted."""
        log.info(
            "layer %s cached: %s from the layer cache", digest, _size(size), extra={"layer": digest}
        )

    def sampling(self, seconds_left: float | None, files: int) -> None:
        """The workload run: a countdown and how many file accesses were seen so far.

        seconds_left None: no time limit (--wait-on-signal); 0: the run is over.
        """
        left = "until it exits or Ctrl-C" if seconds_left is None else f"{seconds_left:.0f}s left"
        text = f"analyzing the workload: {left}, {files} file accesses seen"
        with self._lock:
            if seconds_left is not None and seconds_left <= 0:
                self._clear()
                return
            now = time.monotonic()
            if self._live:
                self._stream.write("\r\x1b[K" + text)
                self._stream.flush()
                self._drawn = True
            elif now - self._last_sample_log >= _LOG_EVERY:
                self._last_sample_log = now
                log.info("%s", text)

    def workload_output(self) -> BinaryIO:
        """A binary stream for the workload's output: it clears the live line first."""
        # It only writes and flushes, which is all the workload's output pump does.
        return cast(BinaryIO, _Passthrough(self))

    def close(self) -> None:
        with self._lock:
            if self._live:
                self._clear()

    def write_through(self, data: bytes) -> None:
        """Write the workload's bytes to the stream, the live line cleared first."""
        with self._lock:
            self._clear()
            self._stream.flush()
            buffer = getattr(self._stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                self._stream.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self._stream.flush()

    def _draw(self) -> None:
        now = time.monotonic()
        parts = [f"{layer.digest[7:19]} {_describe(layer, now)}" for layer in self._layers.values()]
        self._stream.write("\r\x1b[K" + " | ".join(parts))
        self._stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False


class _Passthrough:
    """Writes bytes to the progress stream without garbling its live line."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def write(self, data: bytes) -> int:
        self._progress.write_through(data)
        return len(data)

    def flush(self) -> None:
        self._progress.flush()


def _describe(layer: _Layer, now: float) -> str:
    """A layer under way. bytes_in counts the tar entries rewritten so far, which leave out
    the tar's end blocks and padding: the share is an estimate, so it stops short of 100%
    until finish() reports the whole tar."""
    rate = layer.bytes_in / max(now - layer.started, 1e-6)
    share = f"{min(layer.bytes_in / layer.total, 0.99):.0%} " if layer.total else ""
    return f"{share}{_size(layer.bytes_in)} in, {_size(layer.bytes_out)} out, {_size(rate)}/s"


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point: a 9 KiB
    layer is 9.0 KiB, not 0.0 MiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
