"""Calibration feeds from text for an exported decoder: the built-in Wikipedia extract or your own files.

The same file works in both tools, unchanged:

    ACCULLM_MODEL=out/smollm2 accullm-export calibrate out/smollm2 -o profile --calib calibrators/text.py
    ACCULLM_MODEL=out/smollm2 polygraphy run out/smollm2/model.onnx --onnxrt \\
        --data-loader-script calibrators/text.py

Settings come from the environment (Polygraphy calls ``load_data()`` without arguments):

* ``ACCULLM_MODEL`` (required): the exported folder, for its tokenizer and KV-cache geometry;
* ``ACCULLM_TEXT``: ``wiki:calibration`` (default), ``wiki:evaluation``, a ``.txt`` or ``.jsonl`` file;
* ``ACCULLM_SAMPLES`` (default 8), ``ACCULLM_SEQ_LEN`` (default 128), ``ACCULLM_SEED`` (default 0).
"""

from __future__ import annotations

import os
from pathlib import Path


def load_data():
    """Yield one feed per text window: input_ids, attention_mask, position_ids and an empty KV cache."""
    from accullm_export.calibration.feeds import llm_feeds, text_windows

    if "ACCULLM_MODEL" not in os.environ:
        raise RuntimeError("set ACCULLM_MODEL to the exported model folder")
    folder = Path(os.environ["ACCULLM_MODEL"])
    windows, _ = text_windows(folder, os.environ.get("ACCULLM_TEXT", "wiki:calibration"),
                              int(os.environ.get("ACCULLM_SAMPLES", "8")), int(os.environ.get("ACCULLM_SEQ_LEN", "128")),
                              int(os.environ.get("ACCULLM_SEED", "0")))
    yield from llm_feeds(windows, folder / "model.onnx")
