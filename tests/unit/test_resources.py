"""Memory predicted before a step starts (``accullm_export.resources``): the machine's available memory, the
quantize estimate's parts, the one-line refusal that leaves nothing behind, and the allocator thresholds."""

from __future__ import annotations

import pytest

from accullm_export import resources
from accullm_export.build.quantize import QuantizeOptions, memory_estimate, weight_bytes
from accullm_export.errors import UserError
from accullm_export.graph.io import load_onnx
from accullm_export.graph.linear import find_linear_layers
from accullm_export.calibration.profile import load_profile
from accullm_export.recipes.plan import plan_layers
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.recipes import make_recipe, write_config


def test_available_memory_is_read_from_the_kernel():
    available = resources.available_bytes()
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024
               for line in open("/proc/meminfo").read().splitlines()}
    assert available is not None and 0 < available <= meminfo["MemTotal"] + meminfo.get("SwapTotal", 0)


def test_an_estimate_over_the_available_memory_is_refused_in_one_line(monkeypatch):
    estimate = resources.Estimate("quantize", {"base": 10**9, "weights": 3 * 10**9, "tiny": 10})
    assert estimate.total == 4 * 10**9 + 10 and estimate.line() == "about 4.0 GB (base 1.0, weights 3.0)"
    monkeypatch.setattr(resources, "available_bytes", lambda: 2 * 10**9)
    with pytest.raises(UserError, match=r"^quantize needs about 4.0 GB \(base 1.0, weights 3.0\) of memory, and "
                                        r"this machine has 2.0 GB available"):
        resources.check_memory(estimate)
    monkeypatch.setenv(resources.CHECK_VARIABLE, "off")
    resources.check_memory(estimate)
    monkeypatch.delenv(resources.CHECK_VARIABLE)
    monkeypatch.setattr(resources, "available_bytes", lambda: None)  # a machine that does not say
    resources.check_memory(estimate)
    monkeypatch.setattr(resources, "available_bytes", lambda: 5 * 10**9)
    resources.check_memory(estimate)


def test_the_quantize_estimate_counts_what_the_recipe_holds(planted_model, profile):
    folder, _ = planted_model
    header = load_onnx(folder / "model.onnx", load_external_data=False)
    layers = find_linear_layers(header)
    loaded = load_profile(profile, folder / "model.onnx")
    weights = weight_bytes(folder)
    assert weights >= sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))

    def estimate(recipe, options=QuantizeOptions()):
        return memory_estimate(folder / "model.onnx", plan_layers(recipe, layers, loaded), recipe, options, 32)

    plain = estimate(make_recipe(name="w4a16", block_size=16))
    assert plain.parts["weights"] == weights and plain.parts["second moments"] == 0 and "logits" not in plain.parts
    gptq = estimate(make_recipe(name="w4a16", block_size=16, gptq=True))
    inputs = {layer.input: layer.in_features for layer in layers}
    assert 0 < gptq.parts["second moments"] <= sum(count * count * 4 for count in inputs.values())
    capped = estimate(make_recipe(name="w4a16", block_size=16, gptq=True), QuantizeOptions(moments_mb=0))
    assert capped.parts["second moments"] == 0
    distilled = estimate(make_recipe(name="w4a16", block_size=16, distill_steps=4))
    vocabulary = max(layer.out_features for layer in layers)
    assert distilled.parts["logits"] == 6 * 32 * vocabulary * 4 and distilled.parts["student"] == weights


def test_quantize_refuses_before_any_work_when_memory_is_short(planted_model, profile, tmp_path, capsys,
                                                               monkeypatch):
    folder, _ = planted_model
    monkeypatch.setattr(resources, "available_bytes", lambda: 10**6)
    config = write_config(tmp_path / "r.toml", make_recipe(name="w4a16", block_size=16, gptq=True))
    code, _, err = run_cli(capsys, "quantize", str(folder), "--config", config, "--profile", str(profile), "-o",
                           str(tmp_path / "q"))
    assert_user_error(code, err, "quantize needs about")
    assert "0.0 GB available" in err and not (tmp_path / "q").exists()
    assert not list(tmp_path.glob(".q*"))


def test_device_cuda_without_a_gpu_is_refused_before_any_work(planted_model, profile, tmp_path, capsys):
    """No CUDA execution provider or CUDA torch here: --device cuda stops in one line with exit 3 and writes
    nothing (on a GPU machine the same command runs the statistics passes and distillation there)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider: the refusal cannot be observed")
    folder, _ = planted_model
    config = write_config(tmp_path / "r.toml", make_recipe(name="w4a16", block_size=16, gptq=True))
    code, _, err = run_cli(capsys, "quantize", str(folder), "--config", config, "--profile", str(profile), "-o",
                           str(tmp_path / "q"), "--device", "cuda")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W "))]
    assert code == 3 and len(lines) == 1 and "--device cuda" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "q").exists()
    with pytest.raises(UserError, match="device must be cpu or cuda"):
        QuantizeOptions(device="tpu")


def test_reused_allocations_raises_the_threshold_inside_and_restores_it_after_an_error(monkeypatch):
    """Inside the block freed arrays up to 32 MiB stay with the allocator; after it, even when the block raises,
    the 1 MiB threshold of return_freed_memory and glibc's default trim threshold are back. Without
    return_freed_memory in the process it sets nothing."""
    from accullm_export import resources

    calls = []
    monkeypatch.setattr(resources, "_mallopt", lambda: lambda parameter, value: calls.append((parameter, value)))
    monkeypatch.setattr(resources, "_fixed_threshold", False)
    with resources.reused_allocations():
        pass
    assert calls == []
    resources.return_freed_memory()
    assert calls == [(resources._M_MMAP_THRESHOLD, resources.MMAP_THRESHOLD_BYTES)]
    calls.clear()
    with pytest.raises(RuntimeError):
        with resources.reused_allocations():
            assert calls == [(resources._M_MMAP_THRESHOLD, resources.REUSE_THRESHOLD_BYTES),
                             (resources._M_TRIM_THRESHOLD, 1 << 30)]
            raise RuntimeError("a failing step")
    assert calls[2:] == [(resources._M_MMAP_THRESHOLD, resources.MMAP_THRESHOLD_BYTES),
                         (resources._M_TRIM_THRESHOLD, resources._DEFAULT_TRIM_THRESHOLD)]
