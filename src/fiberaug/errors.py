"""Errors caused by the user's input, reported as one line rather than a traceback."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(ValueError):
    """Bad input or configuration: the message names the value and what would be accepted."""


def find_cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in `exc`'s chain of causes (`raise … from …`), `exc` included; None if none."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__
    return cause
