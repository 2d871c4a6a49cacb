"""Progress bars for the long loops (calibration passes, validation windows): tqdm on a terminal, with the
count and an ETA where the items have a length; nothing when stderr is not a terminal (logs and CI)."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

Item = TypeVar("Item")


def progress(items: Iterable[Item], description: str) -> Iterable[Item]:
    """``items`` with a bar on an interactive stderr (pass a list or other sized collection for an ETA)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, disable=not sys.stderr.isatty())
