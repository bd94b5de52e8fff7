"""Errors caused by the user's input, reported as one line rather than a traceback."""


class UserError(ValueError):
    """Bad input or configuration: the message names the value and what would be accepted."""
