"""Errors raised by both implementations of every fastpath module."""


class FramingError(ValueError):
    """Malformed bytes: a length, offset or encoding does not fit what remains.

    The message says what was expected, what was found, and where.
    """
