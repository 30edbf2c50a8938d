"""ipsecctl's errors and exit status (docs/ipsecctl.md, "Exit status").

0 ok, 1 the server refused or answered something unusable, 2 usage (bad flags, an unreadable or
malformed input file; nothing was sent), 3 cannot connect (the message names the URL/socket).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3


class CtlError(Exception):
    """An error to print (without a traceback) and exit with ``status``."""

    status = EXIT_ERROR

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class UsageError(CtlError):
    status = EXIT_USAGE


class ConnectError(CtlError):
    status = EXIT_CONNECT


class ServerError(CtlError):
    """The server refused the request (its message) or answered something unusable."""

    status = EXIT_ERROR
