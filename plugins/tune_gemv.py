"""Sweep the GEMV kernels' compile-time knobs on a GPU and print the time of each variant (markdown).

    python plugins/tune_gemv.py [--knob ACCULLM_MMA_STAGES=3,4,6] [--knob ACCULLM_MMA_TARGET_BLOCKS=256,512]
                                [--output tune.md]

Every combination of the given knobs (macros of common/gemmCommon.cuh and common/mmaGemvKernel.cuh) is compiled,
in parallel, into its own ``libaccullm_kernels.so`` and timed with ``bench_kernels.py``'s method (CUDA graphs,
weights cycled past the L2 cache) on OutlierSplitGemm cases of SmolLM2 and a 7B model. The defaults in those
headers are meant to be the pick of this sweep on the GPUs it ran on. A tool:
it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plugins import kernels  # noqa: E402
from plugins.bench_kernels import Timer, table, time_gemm  # noqa: E402

DEFAULT_KNOBS = {"ACCULLM_MMA_STAGES": [3, 4, 6], "ACCULLM_MMA_TARGET_BLOCKS": [256, 512, 1024]}
# (K, N, rows, bits, block size)
CASES = [(4096, 11008, 1, 4, 64), (4096, 11008, 1, 8, 0), (11008, 4096, 1, 4, 64), (4096, 11008, 4, 4, 64),
         (4096, 11008, 16, 4, 64), (576, 1536, 1, 4, 64), (1536, 576, 1, 4, 64)]


def knob(text: str) -> tuple[str, list[int]]:
    name, _, values = text.partition("=")
    if not name.startswith("ACCULLM_") or not values:
        raise argparse.ArgumentTypeError(f"expected ACCULLM_NAME=v1,v2,..., got {text!r}")
    return name, [int(value) for value in values.split(",") if value]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--knob", type=knob, action="append", default=[],
                        help=f"a macro and its values (repeatable; default: {DEFAULT_KNOBS})")
    parser.add_argument("--iterations", type=int, default=20, help="graph replays per measurement (default 20)")
    parser.add_argument("--jobs", type=int, default=8, help="variants compiled at once (default 8)")
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tune_gemv.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    knobs = dict(args.knob) or DEFAULT_KNOBS
    variants = [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]
    with tempfile.TemporaryDirectory() as scratch:
        def build(index_defines):
            index, defines = index_defines
            try:
                return kernels.build_library(Path(scratch) / f"v{index}", (f"{major}{minor}",), defines=defines)
            except kernels.KernelBuildError as error:
                print(f"variant {defines} failed to build:\n{error}", file=sys.stderr)
                return None

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            libraries = list(pool.map(build, enumerate(variants)))
        timer = Timer(torch, args.iterations)
        rows = []
        for defines, library in zip(variants, libraries):
            if library is None:
                continue
            lib = kernels.load_library(library)
            times = [time_gemm(torch, lib, timer, np.random.default_rng(0), *case, cublas=False)["ours_seconds"]
                     for case in CASES]
            rows.append([*defines.values(), *(f"{t * 1e6:.1f}" for t in times)])
            print(" | ".join(map(str, rows[-1])), flush=True)
    header = [name.removeprefix("ACCULLM_") for name in knobs] + [f"{k}x{n} m{m} {'int4 b%d' % b if bits == 4 else 'int8'} us" for k, n, m, bits, b in CASES]
    report = f"# GEMV knob sweep on {torch.cuda.get_device_name(0)} (sm_{major}{minor})\n\n" + table(header, rows)
    print(report)
    if args.output:
        args.output.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
