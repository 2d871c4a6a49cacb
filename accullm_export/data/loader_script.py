"""Python files defining ``load_data()``: the data-loader scripts Polygraphy takes as ``--data-loader-script``.

Running one executes it with the user's privileges, so the path must come from the current command line
(``--calib``, ``--data-loader``), never from a profile, bundle, manifest or model folder: what a later step needs
again is stored as data (a profile's ``feeds.npz``).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np

from accullm_export.errors import UserError


def load_data_script(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Run a data-loader script's ``load_data()`` and return its feed dicts.

    Raises:
        UserError: missing file, no load_data, or load_data raised / yielded something that is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data-loader script")
    try:
        namespace = runpy.run_path(str(path))
        if "load_data" not in namespace:
            raise UserError(f"{path} defines no load_data() function")
        feeds = list(namespace["load_data"]())
    except UserError:
        raise
    except Exception as exc:  # the user's script may raise anything
        raise UserError(f"data-loader script {path} raised {type(exc).__name__}: {exc}") from None
    if not feeds or not all(isinstance(feed, dict) for feed in feeds):
        raise UserError(f"{path}: load_data() must yield at least one dict of input name -> array")
    return feeds
