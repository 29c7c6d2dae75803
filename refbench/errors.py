"""User-facing errors.

A `RefbenchError` is bad input or a bad request from the user: the CLI prints it as one line
(`error: <message>` and, when given, `hint: <hint>`) and exits with status 2, no traceback.
Messages name the file (or ref, shard, checkpoint) and what is wrong with it.
"""

from __future__ import annotations


class RefbenchError(Exception):
    """One clear line for the user, plus an optional hint on what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
