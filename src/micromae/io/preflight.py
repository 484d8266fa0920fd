"""Checks a verb makes on its outputs before it starts working: is the path free (or ``--overwrite`` given),
does it name the format written, can its folder be written to, is there room for what will be written.

They run before any encoder pass or training step, so a full, read-only or mistyped output is reported in
seconds, not after the computation, and nothing is left behind by a refused start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from micromae.errors import input_error

__all__ = ["check_free_space", "check_output", "check_writable", "existing_ancestor", "format_bytes"]


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: Path, what: str) -> Path:
    """The nearest folder above ``path`` that exists (``path``'s parent when it exists); a file in the way is
    refused (it would give ENOTDIR later)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise input_error(f"{what} '{path}'", "a path inside a folder", f"'{parent}' is a file, not a folder",
                          "Choose an output path whose parent is a folder (or remove that file)")
    return parent


def check_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the one test that also holds for root and read-only
    mounts (``os.access`` says yes to root on a read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".micromae-write-test-", dir=folder)
    except OSError as exc:
        raise input_error(f"{what} '{path}'", f"a folder micromae can write to ('{folder}')",
                          f"{exc.strerror or exc} (errno {exc.errno})",
                          "Choose another output folder, or fix its permissions / remount it writable") from exc
    os.close(fd)
    os.unlink(probe)


def check_free_space(folder: Path, need_bytes: int, what: str, path: Path | None = None) -> None:
    """Refuse when the disk holding ``folder`` has less than ``need_bytes`` free."""
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise input_error(f"{what} '{path or folder}'", f"about {format_bytes(need_bytes)} of free disk space",
                          f"{format_bytes(free)} free on the disk holding '{folder}'",
                          "Free some space or write to another disk")


def check_output(path: str | os.PathLike, *, overwrite: bool = False, what: str = "--output",
                 suffixes: Sequence[str] | None = None, folder: bool | None = None, need_bytes: int = 0) -> Path:
    """Refuse an output that cannot be written, before any work is done; return it as a :class:`Path`.

    - an existing ``path`` unless ``overwrite`` (a verb's ``--overwrite``);
    - a name not ending in one of ``suffixes`` (case-insensitive), when given;
    - ``folder=True``: an existing file where a folder will be written; ``folder=False``: an existing folder
      where a file will be written (even with ``overwrite``: that is almost surely a mistyped path);
    - a path below a file, or in a folder micromae cannot create files in (read-only, no permission);
    - less free space than ``need_bytes`` on its disk.
    """
    path = Path(path)
    if suffixes and not path.name.lower().rstrip("/\\").endswith(tuple(s.lower() for s in suffixes)):
        raise input_error(f"{what} '{path}'", "a name ending in " + " or ".join(suffixes),
                          f"'{path.name}'", f"Name the output e.g. '{path.stem or 'out'}{suffixes[0]}'")
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise input_error(f"{what} '{path}'", "a path with nothing there yet", f"an existing {kind}",
                          "Choose another output, delete the old one, or pass --overwrite to replace it whole")
    if exists and folder is True and not path.is_dir():
        raise input_error(f"{what} '{path}'", "a folder (or nothing yet)", "a file",
                          "Choose another output path (or remove the file)")
    if exists and folder is False and path.is_dir():
        raise input_error(f"{what} '{path}'", "a file name (or nothing yet)", "a folder",
                          "Choose a file name for the output")
    parent = existing_ancestor(path, what)
    check_writable(parent, path, what)
    check_free_space(parent, need_bytes, what, path)
    return path
