"""qbench's own exceptions share one base, and every message the user sees is one line.

`QBenchError` marks a failure whose message is meant for the user (a file at fault, a setting
out of range, a plugin that broke its contract): `qbench.cli.main` prints it as one line and
exits 2. Anything else that escapes is a bug in qbench and keeps its traceback. Subclasses also
derive from the builtin that says what kind of failure it is (`ValueError`, `FileNotFoundError`,
...), so callers may catch either.
"""

from __future__ import annotations


class QBenchError(Exception):
    """A failure with a message for the user: one line that names the thing at fault."""

    def __str__(self) -> str:
        # LookupError and KeyError subclasses would otherwise repr() the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space.

    Messages from libraries (libsndfile, pydantic, numpy, urllib) can span lines; an error
    must stay one line in a terminal, a log and a result file's `error` field.
    """
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """`TypeName: message` on one line (the type alone when there is no message)."""
    message = one_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
