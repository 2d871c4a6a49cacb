"""The C++ sample's golden loop (samples/cpp/speculative.h), compiled here with the host's C++ compiler and run on
toy models against plain greedy decoding (tests/unit/cpp/golden_test.cpp). The TensorRT side of the sample is
compiled against TensorRT's headers in test_plugin_headers.py; it runs only on a device with TensorRT."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(COMPILER is None, reason="needs a C++17 compiler on PATH (c++, g++ or clang++)")
def test_golden_loop_is_the_verifiers_greedy_output(tmp_path):
    """576 cases: 24 prompts, 1-7 draft tokens, drafts right always, 70% of the time or never, with and without
    end-of-text tokens; the golden output equals plain greedy decoding and the verifier's cache ends as the tokens
    kept."""
    binary = tmp_path / "golden_test"
    compiled = subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                               f"-I{REPO / 'samples' / 'cpp'}", str(REPO / "tests" / "unit" / "cpp" / "golden_test.cpp"),
                               "-o", str(binary)], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok 576", ran.stdout + ran.stderr
