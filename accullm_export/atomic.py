"""Atomic outputs: a crash or an error never leaves half a file or half an output folder behind.

Every command writes its output folder through :func:`atomic_dir`: the work goes into a hidden staging folder
beside the output (``.NAME.XXXXXXXX.partial``) that is renamed into place only when everything succeeded.
:func:`check_output` says, before any heavy work, whether the output path may be written at all:

- a non-empty folder is replaced only with ``overwrite`` and only when it holds a previous output of the same
  kind (its ``manifest.json``, or a validation ``report.json``, names the kind);
- never the current folder or one of its ancestors, never an input, a folder holding an input or a folder
  inside an input folder.

The publish step never deletes what appeared at (or changed in) the output path while the run was working.
A staging folder records its owner's process id, so a later run into the same output removes the staging
folders that a killed run (SIGKILL, power loss) left there; folders without such a record only once they are an
hour old; nothing that does not carry this module's names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from accullm_export.errors import UserError

log = logging.getLogger(__name__)

# where an output folder names its kind: every command writes manifest.json; `validate --report` report.json
KIND_FILES = ("manifest.json", "report.json")
OWNER_FILE = ".accullm-owner.json"  # inside a staging folder while it is being written; removed at publish
STALE_AFTER_S = 3600.0  # a leftover without a readable owner is removed once it is this old
_PARTIAL = re.compile(r"[a-z0-9_]{8}\.partial")  # tempfile.mkdtemp's eight random characters
_BACKUP = re.compile(r"(?:(\d+)-[0-9a-f]{8}\.)?old")  # .NAME.<pid>-<hex>.old, or the older .NAME.old


class OutputAppeared(UserError):
    """Something appeared at the output path (or the previous output there changed) while the run was working;
    it was left as it is and the run's result was discarded."""


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What was at the output path when the run started: enough to tell whether it changed since."""

    device: int
    inode: int
    mtime_ns: int
    kind_digest: str


def kind_of(folder: str | os.PathLike) -> str | None:
    """The ``"kind"`` a previous output in ``folder`` declares (see ``KIND_FILES``), or None."""
    for name in KIND_FILES:
        path = Path(folder) / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and isinstance(document.get("kind"), str):
            return document["kind"]
    return None


def check_output(target: str | os.PathLike, kind: str | Iterable[str] | None, overwrite: bool = False,
                 protected: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output path this run must not write; returns it resolved. Call it before any heavy work.

    Args:
        target: the output folder.
        kind: the manifest kind(s) of a previous output that ``overwrite`` may replace; None only for a folder
            the kit owns (a cache entry), which skips that test.
        overwrite: the user's ``--overwrite``.
        protected: the run's inputs (files or folders; names that are not paths, such as ``wiki``, are skipped).

    Raises:
        UserError: the target is a file, the current folder or an ancestor of it, an input, holds an input or is
            inside an input folder, or is a non-empty folder that ``overwrite`` may not replace.
    """
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"output folder {target} is the current folder or holds it; name a new folder for the output")
    for item in protected:
        if item is None or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if target == source or target in source.parents:
            raise UserError(f"output folder {target} is the input {source} or holds it; name a new folder for the "
                            "output")
        if source.is_dir() and source in target.parents:
            raise UserError(f"output folder {target} is inside the input folder {source}; name a folder outside it")
    if not _holds_anything(target):
        return target
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        label = kinds[0].rsplit("/", 1)[-1]
        if kind_of(target) not in kinds:
            if overwrite:
                raise UserError(f"output folder {target} holds no previous {label} output; refusing to replace it")
            raise UserError(f"output folder {target} is not empty and holds no previous {label} output; name a new "
                            "folder for the output")
        if not overwrite:
            raise UserError(f"output folder {target} is not empty: it holds a previous {label} output (pass "
                            "--overwrite to replace it)")
    elif not overwrite:
        raise UserError(f"output folder {target} is not empty (pass --overwrite to replace it)")
    return target


def _holds_anything(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read output folder {folder}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, *, kind: str | Iterable[str] | None,
               protected: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``target`` that is renamed to ``target`` on success.

    On any exception (KeyboardInterrupt and the CLI's SIGTERM exception included) the staging folder is removed
    and ``target`` is left as it was. Temporary files of the run belong inside the staging folder.

    Args:
        target: the final folder.
        overwrite: replace a previous output of ``kind`` at ``target`` (see :func:`check_output`).
        kind: the manifest kind(s) this output replaces; None only for folders the kit owns (a cache entry).
        protected: the run's inputs, which the output may neither be, hold nor sit inside.

    Raises:
        UserError: :func:`check_output` refuses ``target``, or something appeared at ``target`` (or the previous
            output there changed) while the run was working; that is left as it is and the result is discarded.
    """
    target = check_output(target, kind, overwrite, protected)
    seen = _seen(target)
    created = _first_missing_ancestor(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _write_owner(staging)
        yield staging
        (staging / OWNER_FILE).unlink(missing_ok=True)
        _publish(staging, target, seen)
    except BaseException:
        published = not staging.exists()  # interrupted after the rename: the output is whole, keep its folder
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not published:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _publish(staging: Path, target: Path, seen: _Seen | None) -> None:
    """Rename ``staging`` to ``target``; an old output goes aside first and is deleted last."""
    now = _seen(target)
    if now is not None and seen is None:
        raise OutputAppeared(f"output folder {target} appeared while this run was working; it was left as it is "
                             "and this run's result was discarded")
    if now is not None and now != seen:
        raise OutputAppeared(f"output folder {target} changed while this run was working; it was left as it is and "
                             "this run's result was discarded")
    if now is None:
        _rename_new(staging, target)
        return
    backup = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        with contextlib.suppress(OSError):
            backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _rename_new(staging: Path, target: Path) -> None:
    """Rename onto a path that was free a moment ago; a non-empty folder that appeared since makes rename(2) fail,
    so it is never replaced (an empty one holds nothing to lose)."""
    try:
        staging.rename(target)
    except OSError as exc:
        if target.exists():
            raise OutputAppeared(f"output folder {target} appeared while this run was working; it was left as it is "
                                 "and this run's result was discarded") from None
        raise UserError(f"cannot create {target}: {exc.strerror or exc}") from None


def _seen(target: Path) -> _Seen | None:
    try:
        stat = os.stat(target)
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    for name in KIND_FILES:
        with contextlib.suppress(OSError):
            digest.update(name.encode() + b"\0" + (target / name).read_bytes())
    return _Seen(stat.st_dev, stat.st_ino, stat.st_mtime_ns, digest.hexdigest())


def _first_missing_ancestor(folder: Path) -> Path | None:
    """The outermost folder that ``mkdir(parents=True)`` would create, or None if ``folder`` exists."""
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


# ------------------------------------------------------------------------------------ leftovers of killed runs
def _write_owner(staging: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
    (staging / OWNER_FILE).write_text(json.dumps(record))


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused process id apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _running(pid: int, started: str | None = None) -> bool | None:
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return started is None or _process_start(pid) in (None, started)


def _owner_running(leftover: Path, backup_pid: str | None) -> bool | None:
    """Whether the run that left ``leftover`` still runs: None when it names no owner on this machine."""
    if backup_pid is not None:
        return _running(int(backup_pid))
    try:
        record = json.loads((leftover / OWNER_FILE).read_text())
        if record.get("host") != socket.gethostname():
            return None
        return _running(int(record["pid"]), record.get("started"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove_stale_staging(target: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftovers of earlier runs into ``target``: ``.NAME.XXXXXXXX.partial`` staging folders and
    ``.NAME.<pid>-<hex>.old`` backups beside it whose owner is no longer running, or, when no owner is
    recorded, that are older than ``max_age_s``. Nothing else is touched. Returns what was removed."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            rest = entry.name[len(prefix):]
            backup = _BACKUP.fullmatch(rest)
            if backup is None and _PARTIAL.fullmatch(rest) is None:
                continue
            path = Path(entry.path)
            owner = _owner_running(path, backup.group(1) if backup else None)
            with contextlib.suppress(OSError):
                stale = owner is False or (owner is None and time.time() - entry.stat(follow_symlinks=False).st_mtime
                                           > max_age_s)
                if stale:
                    shutil.rmtree(path)
                    removed.append(path)
                    log.info("removed %s, left by an earlier run that did not finish", path)
    return removed


# ------------------------------------------------------------------------------------------------ single files
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
