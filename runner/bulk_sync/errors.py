"""The one exception type the CLI turns into ``bulk-sync: error: ...`` and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_OUT_OF_SYNC = 1
EXIT_BAD_INPUT = 2
EXIT_DATABASE = 3


class CliError(Exception):
    """An error meant for the user: a one-line message and an exit code."""

    def __init__(
        self, message: str, exit_code: int = EXIT_BAD_INPUT, details: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.details = details or []  # one line each, printed before the message (bad rows)
