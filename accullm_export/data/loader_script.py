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
        UserError: missing file, no load_data, load_data raised or exited, or it yielded something that is not a
            dict of input name -> NumPy array.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data-loader script")
    try:
        namespace = runpy.run_path(str(path))
        if "load_data" not in namespace:
            raise UserError(f"{path} defines no load_data() function")
        if not callable(namespace["load_data"]):
            raise UserError(f"{path}: load_data is of type {type(namespace['load_data']).__name__}, not a function")
        result = namespace["load_data"]()
        if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
            raise UserError(f"data-loader script {path}: load_data() returned a value of type "
                            f"{type(result).__name__}; it must return or yield dicts of input name -> array")
        feeds = list(result)
    except UserError:
        raise
    except SystemExit as exc:  # sys.exit() in the script would end the command without its cleanup
        raise UserError(f"data-loader script {path} called sys.exit({exc.code!r}) instead of returning its "
                        "feeds") from None
    except Exception as exc:  # the user's script may raise anything
        raise UserError(f"data-loader script {path} raised {type(exc).__name__}: {exc}") from None
    if not feeds:
        raise UserError(f"data-loader script {path}: load_data() yielded nothing; it must yield at least one "
                        "dict of input name -> array")
    for number, feed in enumerate(feeds, start=1):
        _check_feed(path, number, feed)
    return feeds


def _check_feed(path: Path, number: int, feed) -> None:
    """One yielded feed: a non-empty dict of input name -> NumPy array of numbers."""
    where = f"data-loader script {path}: feed {number}"
    if not isinstance(feed, dict) or not feed:
        shown = "an empty dict" if isinstance(feed, dict) else f"of type {type(feed).__name__}"
        raise UserError(f"{where} is {shown}, not a dict of input name -> array")
    for name, value in feed.items():
        if not isinstance(name, str):
            raise UserError(f"{where} has the key {name!r}; input names are strings")
        if not isinstance(value, np.ndarray):
            raise UserError(f"{where}: input {name!r} is of type {type(value).__name__}, not a NumPy array")
        if value.dtype.hasobject or value.dtype.kind not in "biuf":
            held = "Python objects" if value.dtype.hasobject else f"{value.dtype} values"
            raise UserError(f"{where}: input {name!r} holds {held}; inputs are arrays of numbers")
