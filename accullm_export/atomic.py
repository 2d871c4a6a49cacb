"""Atomic writes: a crash or an error never leaves half a file or half an output folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from accullm_export.errors import UserError


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that is renamed to ``target`` on success.

    On any exception the temporary folder is removed and ``target`` is left as it was.

    Args:
        target: the final folder.
        overwrite: replace an existing, non-empty ``target``; otherwise that is a UserError.
    """
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"output folder {target} is not empty (pass --overwrite to replace it)")
    created = _first_missing_ancestor(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing_ancestor(folder: Path) -> Path | None:
    """The outermost folder that ``mkdir(parents=True)`` would create, or None if ``folder`` exists."""
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))
