"""Quantize the sample with several flag sets and validate each against the fp32 export: an ablation table.

Each variant is ``accullm-export quantize REFERENCE --profile PROFILE <base flags> <variant flags>``, validated
with the kit's ``validate`` (ORT basic; Δppl, KL, top-1 on held-out Wikipedia windows, greedy prefix). Used to
find where w4a16's error comes from (which layers, which passes). Run from the repository root::

    .venv/bin/python benchmarks/ablate.py --reference bench_out/peers8/work/ours-fp32 \
        --profile bench_out/peers8/work/profile --out bench_out/ablate \
        --variant "all=" --variant "mlp-fp16=--override *mlp*=fp16"

A variant is ``NAME=FLAGS`` (FLAGS split on spaces, e.g. ``--config variant.toml``). ``--base`` defaults to ``--preset w4a16-fast``.
Outputs: ablate.md and ablate.json under --out (rows are appended to the JSON as they finish, so an interrupted
run keeps what it measured), the models under --out/work/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from sparsity import build, validate


def bits_per_weight(folder: Path) -> float | None:
    manifest = json.loads((folder / "manifest.json").read_text())
    return (manifest.get("size") or {}).get("linear_bits_per_weight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", default="--preset w4a16-fast", help="flags every variant starts from")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS")
    parser.add_argument("--text", default="wiki:evaluation",
                        help="validation text (wiki:calibration to choose settings without the evaluation split)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reuse", action="store_true", help="keep models already built under --out/work")
    args = parser.parse_args(argv)

    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        arguments = ("quantize", str(args.reference), "--profile", str(args.profile),
                     *shlex.split(args.base), *shlex.split(flags))
        folder, seconds = build(name, arguments, work, args.reuse)
        started = time.perf_counter()
        result = validate(args.reference, folder, args, text=args.text)
        metrics = result["metrics"]
        rows.append({"name": name, "flags": flags, "bits": bits_per_weight(folder),
                     "delta_ppl_pct": metrics["ppl_delta_pct"], "kl": metrics["kl_mean"],
                     "top1": metrics["top1_agreement"], "greedy_prefix": result["greedy_prefix"],
                     "build_s": seconds, "validate_s": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "ablate.json").write_text(json.dumps({"base": args.base, "text": args.text, "rows": rows},
                                                          indent=1))

    lines = [f"base flags: `{args.base}`; validated on `{args.text}`", "", "| variant | flags | bits/w | Δppl % | KL | top-1 | greedy |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for row in rows:
        bits = f"{row['bits']:.3f}" if row["bits"] is not None else "—"
        lines.append(f"| {row['name']} | `{row['flags']}` | {bits} | {row['delta_ppl_pct']:+.2f} | {row['kl']:.4g} "
                     f"| {row['top1']:.3f} | {row['greedy_prefix']:.1f} |")
    (args.out / "ablate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
