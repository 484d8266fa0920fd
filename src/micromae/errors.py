"""One error type for everything a user can get wrong, with messages that say what to do."""

from __future__ import annotations

import errno
import os


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


def at_least(option: str, value: int | float, minimum: int | float, fix: str | None = None) -> None:
    """Refuse ``value`` below ``minimum`` with an :func:`input_error` naming ``option``."""
    if value < minimum:
        raise input_error(option, f"a value of at least {minimum}", repr(value),
                          fix or f"Pass {option} {minimum} or more")


# errno → what to do, for the OSErrors a user causes (a full or read-only disk, a path that is a file, ...)
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "permission denied: choose a folder you may write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a folder you may write to (or fix its permissions)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file is expected: choose a file name",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "something is already there: choose another path or remove it",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write to another disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or process fewer files at once",
}


def os_error_message(exc: BaseException) -> str | None:
    """A one-line message for an ``OSError`` the user can fix (out of space, read-only, permission denied, a
    file where a folder is expected, ...), naming the path and what to do; ``None`` for anything else, which
    is then an internal error (and shows its traceback)."""
    if not isinstance(exc, OSError) or exc.errno not in _OS_ADVICE:
        return None
    paths = " -> ".join(f"'{p}'" for p in (exc.filename, exc.filename2) if p is not None)
    where = f" at {paths}" if paths else ""
    return f"{exc.strerror or os.strerror(exc.errno)} (errno {errno.errorcode[exc.errno]}){where}; " \
           f"{_OS_ADVICE[exc.errno]}."
