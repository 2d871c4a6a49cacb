"""``accullm-export presets``: the named recipes, what each measured on the sample, and the targets it suits."""

from __future__ import annotations

import argparse
import json

HELP = "list the named recipes (presets): bits per weight, accuracy and build time on the sample, targets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def preset_rows() -> list[dict]:
    """One row per preset: its name, description, backends, the targets it suits and its measurements."""
    from accullm_export.recipes.presets import all_presets
    from accullm_export.targets import TARGETS

    rows = []
    for preset in all_presets().values():
        schemes = {backend: preset.resolve(backend).scheme for backend in preset.backends}
        suits = [target.name for target in TARGETS.values()
                 if target.backend in schemes and schemes[target.backend] in target.recipes()]
        rows.append({"name": preset.name, "description": preset.description, "backends": list(preset.backends),
                     "targets": suits, "default_for": [t.name for t in TARGETS.values()
                                                       if t.default_preset == preset.name],
                     "measured": dict(preset.measured)})
    return rows


def _figure(measured: dict, key: str, spec: str) -> str:
    value = measured.get(key)
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def run(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<12} {'bits/w':>6} {'KL':>7} {'Δppl %':>7} {'KL code':>7} {'decode':>6} {'build min':>9}  targets")
    for row in rows:
        measured = row["measured"]
        print(f"{row['name']:<12} {_figure(measured, 'bits_per_weight', '.2f'):>6} "
              f"{_figure(measured, 'kl', '.4f'):>7} {_figure(measured, 'ppl_delta_pct', '+.2f'):>7} "
              f"{_figure(measured, 'second_text_kl', '.4f'):>7} "
              f"{_figure(measured, 'decode_vs_genai_int4_b64', '.2f'):>6} "
              f"{_figure(measured, 'build_minutes', '.1f'):>9}  {', '.join(row['targets'])}")
        print(f"{'':<12} {row['description']}")
        if row["default_for"]:
            print(f"{'':<12} default for: {', '.join(row['default_for'])}")
    print("measured on the sample (smollm2-135m, onnxruntime form): KL and Δppl on held-out Wikipedia windows, KL "
          "on code (standard-library sources), decode as a ratio to onnxruntime-genai int4 block 64; each preset "
          "file's [measured] table names the command and date")
    return 0
