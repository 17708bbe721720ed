"""The standard streams of a command, made safe to write to whatever the caller did with them.

- **Closed** (`ffdist ... >&-`, a daemon without a terminal): Python starts with
  `sys.stdout = None`, so `sys.stdout.isatty()` fails, and the next file ffdist opens would
  get descriptor 1 and receive everything printed (and a child process's output). A closed
  0, 1 or 2 is opened on /dev/null first (`standard_fds`): the output is discarded, as with
  `>/dev/null`, and the command runs as usual.
- **A reader that left** (`ffdist train ... | head -1`): the next write fails with EPIPE.
  The reader chose to stop reading, not to stop the command: the rest of the output is
  discarded (the descriptor is pointed at /dev/null, so the interpreter's last flush and
  every child process write there too) and the command finishes its work and exits with its
  own code (0 when it succeeded). A training run is never ended by its log's reader.

`guarded()` (entered by ffdist.errors.guard, the one entry of every command) does both and
puts the previous streams back afterwards, so that a caller that runs a command in its own
process keeps its streams. It imports nothing of ffdist.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

STREAMS = ("stdin", "stdout", "stderr")


def standard_fds() -> None:
    """Open /dev/null on each of the descriptors 0, 1, 2 that is closed, and give Python a
    stream for it: later files never land on them, and prints go nowhere instead of failing."""
    for fd, name in enumerate(STREAMS):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


class LeftReader:
    """A text stream around `stream` whose writes never fail because the reader left: at the
    first EPIPE the descriptor is pointed at /dev/null and the text is dropped. Everything
    else (encoding, buffer, ...) is the stream's own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._reader_left()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_left()
        except ValueError:
            pass  # closed by its owner (a test's capture): nothing left to flush

    def _reader_left(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()  # what was buffered goes to /dev/null now

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Closed descriptors opened on /dev/null; stdout and stderr that survive a reader that
    left; the previous sys.stdout / sys.stderr put back at the end."""
    standard_fds()
    before = sys.stdout, sys.stderr
    sys.stdout = before[0] if isinstance(before[0], LeftReader) else LeftReader(before[0])
    sys.stderr = before[1] if isinstance(before[1], LeftReader) else LeftReader(before[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = before
