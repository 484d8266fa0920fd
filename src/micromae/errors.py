"""One error type for everything a user can get wrong, with messages that say what to do."""

from __future__ import annotations


class MicromaeInputError(ValueError):
    """Bad input from the user: a file, an option, a shape or a value that micromae cannot use.

    The message always names what was expected, what was found, and what to do about it. Build it with
    :func:`input_error` so every message has the same three parts.
    """


def input_error(what: str, expected: str, found: str, fix: str) -> MicromaeInputError:
    """Return a :class:`MicromaeInputError` whose message reads
    ``"<what>: expected <expected>, found <found>. <fix>"``.

    >>> raise input_error("volume 'a.tif'", "3 dimensions (ZYX)", "2 dimensions (512, 512)",
    ...                   "Pass a 3-D stack, or --axes YX for a single image.")
    """
    fix = fix.strip()
    if fix and not fix.endswith((".", "!", "?")):
        fix += "."
    return MicromaeInputError(f"{what}: expected {expected}, found {found}. {fix}")
