"""What ONNX Runtime's MatMulNBits fusion does to a w4a16 model: accuracy and decode speed per accuracy level.

At optimization level ``all`` ONNX Runtime fuses DequantizeLinear(int4) + MatMul into ``MatMulNBits`` with the
accuracy level named by the session option ``session.qdq_matmulnbits_accuracy_level`` (default 4: the input is
quantized to int8 per block; 1: float32 compute, the numerics ``validate`` measures at ``basic``). For one level
per run, this validates each model against the fp32 export at ``all`` and times batch-1 decode (the peers
table's timing, 5 interleaved rounds). Run from the repository root, one level after the other::

    for level in 1 4; do .venv/bin/python benchmarks/accuracy_level.py $level bench_out/peers9/work/ours-fp32 \\
        bench_out/peers9/work/ours-w4a16 bench_out/peers9/work/ours-w4a16-b64; done

It prints one line per model and measurement; it never asserts on a time.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import onnxruntime as ort

import peers  # benchmarks/ is on sys.path when a script here runs

CONFIG_KEY = "session.qdq_matmulnbits_accuracy_level"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    level, reference, candidates = argv[0], Path(argv[1]), [Path(path) for path in argv[2:]]
    base = ort.SessionOptions

    class WithLevel(base):  # every session this process opens (the kit's and the timing's) takes the level
        def __init__(self):
            super().__init__()
            self.add_session_config_entry(CONFIG_KEY, level)

    ort.SessionOptions = WithLevel
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, validate

    for candidate in candidates:
        config = LLMValidationConfig(windows=8, seq_len=256, num_prompts=8, new_tokens=64, probes_per_task=0,
                                     optimization="all")
        report = validate(reference, candidate, ValidateOptions(llm=config))
        metrics = report["metrics"]
        print(f"level {level} {candidate.name}: Δppl {metrics['ppl_delta_pct']:+.2f}%, KL {metrics['kl_mean']:.4g}, "
              f"top-1 {metrics['top1_agreement']:.3f}, greedy prefix {report['greedy']['mean_prefix']:.1f}",
              flush=True)
    rows = [peers.Row(name=path.name, label=str(path), folder=str(path)) for path in candidates]
    peers.measure_decode(rows, peers.decode_prompt(reference), dataclasses.replace(peers.FULL, speed_rounds=5))
    for row in rows:
        samples = sorted(row.decode_samples)
        print(f"level {level} {row.name}: decode {samples[len(samples) // 2]:.1f} tok/s (median of {samples})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
