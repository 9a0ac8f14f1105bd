"""The error contract shared by every command: one line, a distinct exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_MISMATCH = 3


class LinkfixError(Exception):
    """An error reported to the user as one line; `exit_code` is the process status."""

    exit_code = EXIT_INTERNAL

    def __init__(self, path: str | None, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"linkfix: {where}{self.message}"


class BadInput(LinkfixError):
    """The input (spec, image, option, output location) is unusable."""

    exit_code = EXIT_BAD_INPUT


class VerifyMismatch(LinkfixError):
    """`linkfix verify` found sites that do not hold what the selection implies."""

    exit_code = EXIT_MISMATCH
