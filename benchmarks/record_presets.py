"""Write what a peers run measured for each preset into that preset's ``[measured]`` table.

``accullm-export presets`` shows these tables; the figures come from one ``benchmarks/peers.py`` run (its
``peers.json``), never typed by hand. Each preset's ``ours-<preset>`` row gives bits per weight, Δppl, KL and
top-1 on the held-out Wikipedia windows, KL on the second text when the run had one, the build time, and decode
speed as a ratio to the run's ``genai-int4-b64`` row. Run from the repository root::

    .venv/bin/python benchmarks/record_presets.py bench_out/presets/peers.json --command "<the peers command>"
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PRESETS = Path(__file__).resolve().parents[1] / "accullm_export" / "recipes" / "presets"
BASELINE = "genai-int4-b64"
HEADER = "# What the preset measured on the sample (benchmarks/record_presets.py)"


def measured_table(row: dict, run: dict, baseline: dict | None, command: str) -> dict:
    """The ``[measured]`` entries of one preset from its peers row."""
    metrics, second = row["metrics"], row.get("second_metrics")
    speed, base_speed = row.get("decode_tokens_per_second"), (baseline or {}).get("decode_tokens_per_second")
    table = {
        "model": "smollm2-135m", "backend": "onnxruntime", "date": run["environment"]["date"][:10],
        "command": command, "text": run["validation"]["text"], "windows": run["validation"]["windows"],
        "bits_per_weight": round(row["bits_per_weight"], 3), "kl": round(metrics["kl_mean"], 5),
        "ppl_delta_pct": round(metrics["ppl_delta_pct"], 2), "top1": round(metrics["top1_agreement"], 4),
    }
    if second:
        table |= {"second_text": Path(run["settings"]["second_text"]).name, "second_text_kl": round(second["kl_mean"], 5),
                  "second_text_ppl_delta_pct": round(second["ppl_delta_pct"], 2)}
    if row.get("build_seconds") is not None:
        table["build_minutes"] = round(row["build_seconds"] / 60, 1)
    if speed and base_speed:
        table[f"decode_vs_{BASELINE.replace('-', '_')}"] = round(speed / base_speed, 3)
    return table


def write_measured(path: Path, table: dict) -> None:
    """Replace (or append) the ``[measured]`` table at the end of a preset file, keeping everything else."""
    from accullm_export.recipes.toml_io import dump_toml

    text = re.split(r"\n\[measured\]\n", path.read_text(), maxsplit=1)[0].rstrip()
    while text.endswith(HEADER):  # the comment previous runs wrote above the table
        text = text[:-len(HEADER)].rstrip()
    body = dump_toml({"measured": table})
    path.write_text(text + "\n\n" + HEADER + "\n" + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peers_json", type=Path)
    parser.add_argument("--command", required=True, help="the peers.py command line that produced the file")
    args = parser.parse_args(argv)
    run = json.loads(args.peers_json.read_text())
    rows = {row["name"]: row for row in run["rows"]}
    written = []
    for path in sorted(PRESETS.glob("*.toml")):
        row = rows.get(f"ours-{path.stem}")
        if row is None or row["status"] != "ok" or row["metrics"] is None:
            continue
        write_measured(path, measured_table(row, run, rows.get(BASELINE), args.command))
        written.append(path.stem)
    print(f"wrote [measured] for {', '.join(written) or 'no preset'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
