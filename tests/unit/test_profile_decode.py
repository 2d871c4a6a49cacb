"""benchmarks/profile_decode.py on a tiny export: it profiles decode steps and sums them per op type."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_profile_decode_reports_each_folder(tiny_exports, tmp_path, capsys):
    import profile_decode

    _, folder = tiny_exports["llama"]
    assert profile_decode.main([str(folder), "--steps", "3", "--out", str(tmp_path / "t.md")]) == 0
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith(f"| {folder} "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    run_ms, kernel_ms, nodes = float(cells[1]), float(cells[2]), float(cells[3])
    assert 0 < kernel_ms <= run_ms and nodes > 10 and "Attention" in cells[4]
    assert profile_decode.main([str(tmp_path / "none")]) == 2


def test_summarize_skips_the_prefill():
    import profile_decode

    events = [{"name": "model_run", "ts": 0, "dur": 900}, {"cat": "Node", "name": "a_kernel_time", "ts": 1,
                                                          "dur": 800, "args": {"op_name": "MatMul"}},
              {"name": "model_run", "ts": 1000, "dur": 100}, {"cat": "Node", "name": "b_kernel_time", "ts": 1001,
                                                             "dur": 60, "args": {"op_name": "Add"}},
              {"name": "model_run", "ts": 2000, "dur": 300}, {"cat": "Node", "name": "c_kernel_time", "ts": 2001,
                                                             "dur": 40, "args": {"op_name": "Add"}}]
    result = profile_decode.summarize(events)
    assert result == {"run_us": 200, "kernel_us": 50, "nodes": 1, "ops": {"Add": 50}}
