"""``accullm-export targets``: the deployment targets and what each can run."""

from __future__ import annotations

import argparse
import json

HELP = ("list the deployment targets: compute capability, TensorRT version, precisions, default preset, memory "
        "bandwidth, DLA")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from accullm_export.targets import TARGETS

    if args.json:
        print(json.dumps([target.to_dict() for target in TARGETS.values()], indent=2))
        return 0
    print(f"{'target':<10} {'backend':<11} {'SM':<5} {'TensorRT':<18} {'bandwidth':>10} {'DLA':>3}  {'default':<7} "
          "precisions / device")
    for target in TARGETS.values():
        bandwidth = f"{target.bandwidth_gbps:g} GB/s" if target.bandwidth_gbps else "measured"
        tensorrt = f"{target.tensorrt_version} ({target.tensorrt_stack})" if target.tensorrt_version else "-"
        tensorrt = tensorrt if len(tensorrt) <= 18 else target.tensorrt_version
        print(f"{target.name:<10} {target.backend:<11} {target.cuda_arch or '-':<5} {tensorrt:<18} {bandwidth:>10} "
              f"{target.dla_cores:>3}  {target.default_preset:<7} {','.join(target.precisions)} / {target.device}")
    return 0
