"""Paths taken from files stay inside their folders.

A model, profile or manifest names other files: ONNX external-data locations, the tokenizer and configs beside a
model, a profile's arrays. Each such name is checked here before anything reads, hashes or copies the file it
names: no absolute paths, no ``..``, no symlink that resolves outside the folder, and nothing but a regular file
(a device such as ``/dev/zero`` or a FIFO would make a reader hang). The check uses ``os.stat`` and never opens
the file, since opening a FIFO blocks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from accullm_export.errors import UserError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def inside(folder: str | os.PathLike, relative: str | os.PathLike, *, named_by: str | os.PathLike | None = None,
           what: str = "file", roots: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved path of ``relative`` (a name read from ``named_by``), refused unless it stays in ``folder``.

    Args:
        folder: the folder the name is relative to (a model's folder, a profile folder).
        relative: the name as the file states it.
        named_by: the file that states it, for the message (default: ``folder``).
        what: what the name is, for the message ("external data of tensor w", "side file").
        roots: further folders a symlink may resolve into (a Hugging Face cache snapshot's ``blobs``).

    Returns:
        The resolved path: a regular file inside ``folder`` (or ``roots``).

    Raises:
        UserError: (one line naming ``named_by`` and the entry) an empty, absolute or ``..`` name, a symlink that
            leaves the folder, a missing file, or anything that is not a regular file.
    """
    text = os.fspath(relative)
    where = f"{named_by if named_by is not None else folder}: {what} {text!r}"
    if not text or "\x00" in text:
        raise UserError(f"{where} is not a file name")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise UserError(f"{where} is an absolute path; only names inside {folder} are read")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise UserError(f"{where} climbs out with '..'; only names inside {folder} are read")
    base = Path(os.path.realpath(folder))
    resolved = Path(os.path.realpath(base / text))
    allowed = [base] + [Path(os.path.realpath(root)) for root in roots]
    if not any(resolved == root or root in resolved.parents for root in allowed):
        raise UserError(f"{where} is a symlink to {resolved}, outside {folder}; only files inside it are read")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise UserError(f"{where} is missing ({base / text} does not exist)") from None
    except OSError as exc:
        raise UserError(f"{where} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UserError(f"{where} is {kind}, not a regular file; refused")
    return resolved


def hf_cache_roots(folder: str | os.PathLike) -> tuple[Path, ...]:
    """Where a Hugging Face hub cache snapshot's symlinks point: ``<repo>/blobs`` beside ``<repo>/snapshots``."""
    folder = Path(os.path.realpath(folder))
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return (folder.parent.parent / "blobs",)
    return ()
