"""One family of errors, and the exit code of each (mapped in one place).

Every error tidstorage raises for something a user or operator can act on
derives from :class:`TidstorageError`. The command line (``cli/``) catches
this root only and exits with :attr:`TidstorageError.exit_code`; nothing
else decides exit codes. Modules raise their own subclass (defined here, so
that this module imports nothing of tidstorage and anything can use it).

======================  ====  ==============================================
error                   exit  raised for
======================  ====  ==============================================
ConfigError             2     a configuration or usage problem
ToolError               1     an operator tool could not do its job
TidLogError             1     a TID log that cannot be read as one
ScanError               1     a ``Data.fs`` that is not what it should be
ClientError             1     the daemon unreachable, or a bad answer
ZeoUnavailable          1     a ZEO server unreachable, or refusing a commit
ProtocolError           1     malformed bytes on the wire
======================  ====  ==============================================

``Refused`` (``core/tracker.py``) is not here: it is the daemon's own answer
to a report that breaks a rule, logged and never shown as an error.
"""

from __future__ import annotations

__all__ = [
    "TidstorageError", "ConfigError", "ToolError", "TidLogError", "ScanError",
    "ClientError", "ZeoUnavailable", "ProtocolError",
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE",
]

#: Exit codes of every command but ``status`` (which follows the monitoring
#: plugin conventions).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class TidstorageError(Exception):
    """The root of tidstorage's errors; the message is for the user."""

    exit_code = EXIT_FAILURE


class ConfigError(TidstorageError):
    """A configuration problem; the message names the file and key."""

    exit_code = EXIT_USAGE


class ToolError(TidstorageError):
    """An operator tool (backup, restore, ...) could not do its job; the
    message says what, and what was left as it was."""


class TidLogError(TidstorageError):
    """A TID log line or file that cannot be read."""

    def __init__(self, reason: str, path: str = "<tidlog>", lineno: int = 0) -> None:
        self.reason = reason
        self.path = path
        self.lineno = lineno
        super().__init__(f"{path}:{lineno}: {reason}")


class ScanError(TidstorageError):
    """A FileStorage file is not what it should be at some offset."""

    def __init__(self, path, offset, reason):
        super().__init__(path, offset, reason)
        self.path = path
        self.offset = offset
        self.reason = reason

    def __str__(self):
        import os

        where = os.fspath(self.path) if self.path is not None else "<unknown>"
        if self.offset is None:
            return f"{where}: {self.reason}"
        return f"{where}: offset {self.offset}: {self.reason}"


class ClientError(TidstorageError):
    """The daemon could not be reached, or answered something unexpected."""


class ZeoUnavailable(TidstorageError):
    """A ZEO storage could not be reached or refused a commit."""

    def __init__(self, message: str, storage_id: str | None = None, address=None):
        super().__init__(message)
        self.storage_id = storage_id
        self.address = address


class ProtocolError(TidstorageError, ValueError):
    """Malformed input on the wire; the message says what and where."""
