"""Error types shared by every layer of the tool.

Every error the user can cause derives from EstargzOptError; the CLI turns it into one
line on stderr and a non-zero exit. Anything else is a bug and keeps its traceback.
"""


class EstargzOptError(Exception):
    """A failure the user can act on; the message is a complete sentence-like line."""


class BadInputError(EstargzOptError):
    """The input layer or image is malformed, truncated or unsupported."""


class VerificationError(EstargzOptError):
    """A converted layer does not match its TOC, digest or annotations."""


class UsageError(EstargzOptError):
    """The command line asks for something contradictory or impossible (exit status 2,
    like every other usage error)."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run. It unwinds like Ctrl-C (every `finally` and
    `except BaseException` rolls back what was written), then the run exits 128 + the
    signal, as shells report a signal (130 for Ctrl-C, 143 for SIGTERM). Not an
    Exception, so no handler takes it for a failure; not a KeyboardInterrupt, so click
    prints nothing of its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
