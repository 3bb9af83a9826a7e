"""Bad input versus bugs: :class:`UsageError` is raised where input (an option, a file, a row, a folder) is checked,
and the entry points print it as one line with exit status 2; any other exception keeps its traceback. Setting
``ACTIVATION_TRANSFER_DEBUG=1`` shows the traceback of a usage error too.
"""

from __future__ import annotations

import os

DEBUG_ENV = "ACTIVATION_TRANSFER_DEBUG"


class UsageError(ValueError):
    """Bad input, with a message of one line naming the option, file or row and the fix (a ``ValueError``, so
    callers that caught those keep working)."""


def debug_enabled() -> bool:
    """Whether ``ACTIVATION_TRANSFER_DEBUG`` asks for tracebacks of usage errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (a wrapped library message may span several)."""
    return " ".join(str(err).split())


class MissingInput(UsageError, FileNotFoundError):
    """A file or folder that the input names does not exist: bad input (one line, exit 2) that is also a
    ``FileNotFoundError``, as the library raised before."""
