"""GPTQ, AWQ and the Hessian collector against independent NumPy emulations written here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from accullm_export.calibration.hessian import StreamedHessians, collect_hessians
from accullm_export.errors import UserError
from accullm_export.quant.awq import candidate_scales, search_awq_scales
from accullm_export.quant.gptq import gptq_proxy_error, gptq_quantize
from accullm_export.quant.symmetric import CLIP_RATIOS, dequantize, quantize

LARGE_CHANNELS = [3, 17, 30]


# ---- emulations -------------------------------------------------------------------------------------------------

def reference_scales(weight: np.ndarray, bits: int, block_size: int | None) -> np.ndarray:
    """absmax / qmax per (block of rows, column), written as a plain loop; all-zero blocks get 1; blocked scales
    are stored in FP16, so they are FP16 values (at least FP16's smallest normal)."""
    weight = np.asarray(weight, dtype=np.float32)
    step = weight.shape[0] if block_size is None else block_size
    limit = np.float32(2 ** (bits - 1) - 1)
    rows = [np.abs(weight[start:start + step]).max(axis=0) / limit for start in range(0, weight.shape[0], step)]
    scales = np.stack(rows).astype(np.float32)
    scales = np.where(scales == 0, np.float32(1.0), scales)
    if block_size is not None:
        scales = np.maximum(scales, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)
    return scales


def reference_fake_quantize(weight: np.ndarray, bits: int, block_size: int | None) -> np.ndarray:
    weight = np.asarray(weight, dtype=np.float32)
    scales = reference_scales(weight, bits, block_size)
    step = weight.shape[0] if block_size is None else block_size
    per_row = np.repeat(scales, step, axis=0)[:weight.shape[0]]
    limit = 2 ** (bits - 1) - 1
    return (np.clip(np.round(weight / per_row), -limit, limit) * per_row).astype(np.float32)


def naive_gptq(weight: np.ndarray, hessian: np.ndarray, row_scales: np.ndarray, bits: int,
               damp: float = 0.01) -> np.ndarray:
    """Textbook GPTQ/OBQ, one row at a time: explicit H^-1, error spread by H^-1[j, i] / H^-1[i, i], then the
    Schur complement removes row i from H^-1. Returns the dequantized weight."""
    work = np.asarray(weight, dtype=np.float64).copy()
    hessian = np.asarray(hessian, dtype=np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    work[dead] = 0.0
    hessian += damp * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    inverse = np.linalg.inv(hessian)
    limit = 2 ** (bits - 1) - 1
    result = np.zeros_like(work)
    for i in range(work.shape[0]):
        scale = row_scales[i].astype(np.float64)
        result[i] = np.clip(np.round(work[i] / scale), -limit, limit) * scale
        error = work[i] - result[i]
        work[i + 1:] -= np.outer(inverse[i + 1:, i] / inverse[i, i], error)
        inverse = inverse - np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return result


def per_row(scales: np.ndarray, rows: int, block_size: int | None) -> np.ndarray:
    step = rows if block_size is None else block_size
    return np.repeat(scales, step, axis=0)[:rows]


def correlated_problem(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight and H = X^T X / n of correlated inputs with a few large channels."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(rows) + 0.4 * rng.standard_normal((rows, rows))
    inputs = rng.standard_normal((512, rows)) @ mixing
    inputs[:, LARGE_CHANNELS] *= 15.0
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    return weight, inputs.T @ inputs / len(inputs)


# ---- GPTQ ---------------------------------------------------------------------------------------------------

# ---- scale search ------------------------------------------------------------------------------------------

def brute_force_search(weight, block_size, importance):
    """For every (block, column), try each candidate absmax * r / d in a plain loop; keep the least weighted
    error (ties: the plain absmax / 7 scale first, then candidates in order)."""
    rows, cols = weight.shape
    scales = []
    for start in range(0, rows, block_size):
        chunk, weights = weight[start:start + block_size].astype(np.float32), importance[start:start + block_size]
        row = []
        for column in range(cols):
            values = chunk[:, column]
            peak = np.float32(np.abs(values).max())

            def error(scale):
                rounded = np.clip(np.round(values / scale), -8, 7) * scale
                return float((weights * (rounded - values) ** 2).sum())

            half = lambda x: np.float32(np.float16(max(x, np.finfo(np.float16).tiny)))
            best = half(peak / np.float32(7)) if peak else np.float32(1)
            least = error(best)
            for ratio in CLIP_RATIOS:
                for divisor in (7, 8):
                    candidate = half(peak * np.float32(ratio / divisor)) if peak else np.float32(1)
                    if error(candidate) < least:
                        best, least = candidate, error(candidate)
            row.append(best)
        scales.append(row)
    return np.asarray(scales, dtype=np.float32)


@pytest.mark.parametrize("block_size", [16, 12])
def test_scale_search_matches_brute_force_and_beats_plain_rounding(block_size):
    rng = np.random.default_rng(3)
    weight = rng.standard_t(3, size=(40, 9)).astype(np.float32)  # heavy tails: clipping pays
    weight[:, 4] = 0.0  # an all-zero column keeps scale 1
    importance = rng.uniform(0.1, 4.0, size=40)
    values, scales = quantize(weight, 4, block_size, search=True, importance=importance)
    np.testing.assert_array_equal(scales, brute_force_search(weight, block_size, importance))
    assert values.min() >= -8 and values.max() <= 7 and (values == -8).any()  # the full grid is used
    plain_values, plain_scales = quantize(weight, 4, block_size)
    weighted = lambda q: float((importance[:, None] * (q - weight) ** 2).sum())
    assert weighted(dequantize(values, scales, block_size)) < 0.9 * weighted(dequantize(plain_values, plain_scales,
                                                                                        block_size))
    assert not np.array_equal(scales, plain_scales)


def test_gptq_with_scale_search_and_identity_hessian_is_searched_rounding():
    """With H = I, GPTQ spreads no error: it equals rounding with the searched scales (importance 1)."""
    weight = np.random.default_rng(4).standard_t(3, size=(40, 24)).astype(np.float32)
    values, scales = gptq_quantize(weight, np.eye(40), 4, 16, search=True)
    expected_values, expected_scales = quantize(weight, 4, 16, search=True, importance=np.ones(40))
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(values, expected_values)


def test_gptq_with_scale_search_lowers_the_proxy_error():
    weight, hessian = correlated_problem(40, 24, seed=5)
    weight = np.random.default_rng(5).standard_t(3, size=weight.shape).astype(np.float32)
    errors = {}
    for search in (False, True):
        values, scales = gptq_quantize(weight, hessian, 4, 16, search=search, act_order=True)
        errors[search] = gptq_proxy_error(weight, dequantize(values, scales, 16), hessian)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("bits,block_size", [(4, 16), (8, None), (4, None)])
def test_gptq_with_identity_hessian_is_plain_rounding(bits, block_size):
    weight = np.random.default_rng(0).standard_normal((40, 24)).astype(np.float32)
    values, scales = gptq_quantize(weight, np.eye(40), bits, block_size)
    expected_values, expected_scales = quantize(weight, bits, block_size)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(values, expected_values)
    assert values.dtype == np.int8 and scales.dtype == np.float32


@pytest.mark.parametrize("batch", [128, 7])
@pytest.mark.parametrize("bits,block_size", [(4, 16), (8, None)])
def test_gptq_matches_naive_textbook_loop(bits, block_size, batch):
    weight, hessian = correlated_problem(40, 24, seed=1)
    values, scales = gptq_quantize(weight, hessian, bits, block_size, batch=batch)
    expected_scales = reference_scales(weight, bits, block_size)
    np.testing.assert_array_equal(scales, expected_scales)
    assert scales.shape == ((3, 24) if block_size else (1, 24))  # 40 rows: blocks of 16, 16 and a ragged 8
    expected = naive_gptq(weight, hessian, per_row(expected_scales, 40, block_size), bits)
    np.testing.assert_allclose(dequantize(values, scales, block_size), expected, rtol=0, atol=1e-5)
    assert np.abs(values).max() <= 2 ** (bits - 1) - 1
    # GPTQ moved rows away from plain rounding: the comparison is not trivially RTN against RTN
    assert (values != quantize(weight, bits, block_size)[0]).mean() > 0.05


@pytest.mark.parametrize("bits,block_size", [(4, 16), (8, None)])
def test_gptq_act_order_is_the_naive_loop_on_permuted_rows_with_static_scales(bits, block_size):
    """act-order: rows go largest H[i, i] first; each row keeps the scale of its block in the original layout."""
    weight, hessian = correlated_problem(40, 24, seed=4)
    values, scales = gptq_quantize(weight, hessian, bits, block_size, act_order=True)
    np.testing.assert_array_equal(scales, reference_scales(weight, bits, block_size))
    order = np.argsort(-np.diag(hessian), kind="stable")
    assert not np.array_equal(order, np.arange(40))
    permuted = naive_gptq(weight[order], hessian[np.ix_(order, order)], per_row(scales, 40, block_size)[order], bits)
    expected = np.empty_like(permuted)
    expected[order] = permuted
    np.testing.assert_allclose(dequantize(values, scales, block_size), expected, rtol=0, atol=1e-5)
    plain = dequantize(*gptq_quantize(weight, hessian, bits, block_size), block_size)
    assert not np.allclose(dequantize(values, scales, block_size), plain)


def test_gptq_dead_input_is_zero_and_matches_naive():
    weight, hessian = correlated_problem(40, 24, seed=2)
    hessian *= 1e-3  # small enough that the dead input's unit diagonal moves the damping (mean of the diagonal)
    hessian[5, :] = hessian[:, 5] = 0.0
    values, scales = gptq_quantize(weight, hessian, 4, 16, batch=8)
    assert not values[5].any()
    expected = naive_gptq(weight, hessian, per_row(reference_scales(weight, 4, 16), 40, 16), 4)
    np.testing.assert_allclose(dequantize(values, scales, 16), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,block_size", [(4, 16), (4, None), (8, 32)])
def test_gptq_proxy_error_below_rounding(bits, block_size):
    weight, hessian = correlated_problem(64, 48, seed=3)
    values, scales = gptq_quantize(weight, hessian, bits, block_size)
    gptq_error = gptq_proxy_error(weight, dequantize(values, scales, block_size), hessian)
    rounding_error = gptq_proxy_error(weight, reference_fake_quantize(weight, bits, block_size), hessian)
    assert gptq_error < 0.8 * rounding_error


def test_gptq_proxy_error_is_trace_formula():
    rng = np.random.default_rng(4)
    weight, other = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    inputs = rng.standard_normal((50, 6))
    hessian = inputs.T @ inputs / 50
    output_error = ((inputs @ weight - inputs @ other) ** 2).sum() / 50
    assert gptq_proxy_error(weight, other, hessian) == pytest.approx(output_error, rel=1e-10)


@pytest.mark.parametrize("block_size", [16, None])
def test_gptq_excluded_rows_are_zero_and_dropped_from_the_problem(block_size):
    weight, hessian = correlated_problem(40, 24, seed=5)
    excluded = LARGE_CHANNELS
    kept = np.setdiff1d(np.arange(40), excluded)
    values, scales = gptq_quantize(weight, hessian, 4, block_size, exclude=excluded, batch=5)
    assert not values[excluded].any()
    assert not dequantize(values, scales, block_size)[excluded].any()
    zeroed = weight.copy()
    zeroed[excluded] = 0.0
    np.testing.assert_array_equal(scales, reference_scales(zeroed, 4, block_size))
    row_scales = per_row(scales, 40, block_size)[kept]
    expected = naive_gptq(weight[kept], hessian[np.ix_(kept, kept)], row_scales, 4)
    np.testing.assert_allclose(dequantize(values, scales, block_size)[kept], expected, rtol=0, atol=1e-5)
    if block_size is None:  # per-channel scales do not depend on where the rows sit: rerun on the reduced weight
        reduced_values, reduced_scales = gptq_quantize(weight[kept], hessian[np.ix_(kept, kept)], 4, None)
        np.testing.assert_array_equal(reduced_scales, scales)
        np.testing.assert_array_equal(reduced_values, values[kept])


def test_gptq_rejects_bad_hessians():
    weight = np.ones((4, 3), dtype=np.float32)
    broken = np.eye(4)
    broken[1, 2] = np.nan
    with pytest.raises(UserError, match="non-finite"):
        gptq_quantize(weight, broken, 4)
    with pytest.raises(UserError, match="not positive definite"):
        gptq_quantize(weight, -np.eye(4), 4)
    with pytest.raises(UserError, match="Hessian has shape"):
        gptq_quantize(weight, np.eye(3), 4)
    with pytest.raises(UserError, match="excluded"):
        gptq_quantize(weight, np.eye(4), 4, exclude=[4])


def test_gptq_retries_with_more_damping():
    # v v^T - c I has eigenvalues -c (and |v|^2 - c). With c = 9% of the mean diagonal m, damping 1% of m falls
    # short and the first retry's 10% works: the result must equal the naive loop with damping 0.1
    rng = np.random.default_rng(6)
    vector = rng.standard_normal(12)
    mean_diagonal = vector @ vector / 12 / (1 + 0.09)
    hessian = np.outer(vector, vector) - 0.09 * mean_diagonal * np.eye(12)
    assert np.mean(np.diag(hessian)) == pytest.approx(mean_diagonal)
    weight = rng.standard_normal((12, 8)).astype(np.float32)
    values, scales = gptq_quantize(weight, hessian, 4)
    expected = naive_gptq(weight, hessian, per_row(reference_scales(weight, 4, None), 12, None), 4, damp=0.1)
    np.testing.assert_allclose(dequantize(values, scales), expected, rtol=0, atol=1e-5)


# ---- AWQ ----------------------------------------------------------------------------------------------------

def awq_problem(seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((48, cols)).astype(np.float32) for cols in (32, 16, 16)]
    mean_abs = np.exp(rng.normal(0.0, 1.0, 48))
    mean_abs[[2, 9]] *= 30.0
    mean_abs[11] = 0.0
    second_moment = 1.6 * mean_abs ** 2
    return weights, mean_abs, second_moment


def brute_force_awq(weights, mean_abs, second_moment, bits, block_size, excluded, grid):
    """Every alpha, the error of each weight quantized on its own, channel by channel."""
    active = [c for c in range(len(mean_abs)) if c not in excluded and mean_abs[c] > 0]
    best = None
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        scales = np.ones(len(mean_abs))
        powered = mean_abs[active] ** alpha
        scales[active] = powered / np.sqrt(powered.max() * powered.min())
        scales = scales.astype(np.float32)
        error = 0.0
        for weight in weights:
            scaled = (weight * scales[:, None]).astype(np.float32)
            scaled[list(excluded)] = 0.0
            quantized = reference_fake_quantize(scaled, bits, block_size)
            for channel in range(len(mean_abs)):
                if channel not in excluded:
                    squared = np.sum((quantized[channel].astype(np.float64) - scaled[channel]) ** 2)
                    error += second_moment[channel] / float(scales[channel]) ** 2 * squared
        if best is None or error < best[2]:
            best = (scales, alpha, error)
    return best


@pytest.mark.parametrize("bits,block_size,excluded", [(4, 16, ()), (4, None, (2, 20)), (8, 32, (9,))])
def test_awq_matches_brute_force(bits, block_size, excluded):
    weights, mean_abs, second_moment = awq_problem(seed=7)
    for weight in weights:  # outlier weights on the excluded rows would widen the scales unless zeroed
        weight[list(excluded)] *= 20.0
    result = search_awq_scales(weights, mean_abs, second_moment, bits, block_size, exclude=excluded, grid=10)
    scales, alpha, error = brute_force_awq(weights, mean_abs, second_moment, bits, block_size, set(excluded), 10)
    assert result.alpha == pytest.approx(alpha)
    np.testing.assert_allclose(result.scales, scales, rtol=1e-6)
    assert min(e for _, e in result.errors) == pytest.approx(error, rel=1e-6)
    assert [a for a, _ in result.errors] == pytest.approx(list(np.linspace(0, 1, 11)))
    assert result.scales.dtype == np.float32 and result.scales.shape == (48,)
    assert np.all(result.scales[list(excluded) + [11]] == 1.0)  # excluded and silent channels keep 1


def test_awq_beats_rounding_and_alpha_zero_is_plain_rounding():
    weights, mean_abs, second_moment = awq_problem(seed=8)
    result = search_awq_scales(weights, mean_abs, second_moment, 4, 16)
    assert result.alpha > 0 and result.errors[0] == (0.0, result.baseline_error)
    chosen = dict(result.errors)[result.alpha]
    assert chosen <= result.baseline_error and chosen == min(e for _, e in result.errors)
    # the baseline is plain rounding's diagonal-covariance error, computed from scratch
    baseline = sum(float(np.sum(second_moment[:, None] * (reference_fake_quantize(w, 4, 16) - w) ** 2))
                   for w in weights)
    assert result.baseline_error == pytest.approx(baseline, rel=1e-6)
    np.testing.assert_array_equal(candidate_scales(mean_abs, 0.0, mean_abs > 0), np.ones(48, dtype=np.float32))


def test_awq_flat_activations_keep_unit_scales():
    weights, _, _ = awq_problem(seed=9)
    flat = np.full(48, 0.7)
    result = search_awq_scales(weights, flat, flat ** 2, 4, 16, grid=4)
    assert result.alpha == 0.0
    np.testing.assert_array_equal(result.scales, np.ones(48, dtype=np.float32))


def test_awq_rejects_bad_input():
    weights, mean_abs, second_moment = awq_problem(seed=10)
    with pytest.raises(UserError, match="shape"):
        search_awq_scales(weights, mean_abs[:10], second_moment, 4, 16)
    with pytest.raises(UserError, match="in_features"):
        search_awq_scales([weights[0], weights[1][:5]], mean_abs, second_moment, 4, 16)
    with pytest.raises(UserError, match="non-negative"):
        search_awq_scales(weights, -mean_abs, second_moment, 4, 16)


# ---- Hessian collection ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory):
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj/MatMul")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "sequence", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    graph.node.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    path = tmp_path_factory.mktemp("hessian") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = [{"x": rng.standard_normal((1, 6, 8)).astype(np.float32) * (1 + np.arange(8, dtype=np.float32))}
             for _ in range(3)]
    return path, weight, feeds


def assert_float32_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """float32 sums against float64 ones: within a few float32 roundings of the largest entry."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("skip_first_position", [True, False])
def test_collect_hessians_equals_numpy(matmul_model, skip_first_position):
    path, weight, feeds = matmul_model
    hessians = collect_hessians(path, ["x", "y"], lambda: iter(feeds), skip_first_position=skip_first_position)
    start = 1 if skip_first_position else 0
    inputs = np.concatenate([feed["x"][0, start:] for feed in feeds]).astype(np.float64)
    outputs = np.concatenate([feed["x"][0, start:] @ weight for feed in feeds]).astype(np.float64)
    assert len(inputs) == (15 if skip_first_position else 18)
    assert list(hessians) == ["x", "y"] and hessians["x"].dtype == np.float32
    assert_float32_close(hessians["x"], inputs.T @ inputs / len(inputs))
    assert_float32_close(hessians["y"], outputs.T @ outputs / len(outputs))


def test_collect_hessians_sums_each_batch_in_float32(matmul_model):
    """The float32 sums, one batch at a time as the feeds arrive, divided by the rows: bit for bit."""
    path, _, feeds = matmul_model
    hessians = collect_hessians(path, ["x"], lambda: iter(feeds))
    sums = np.zeros((8, 8), dtype=np.float32)
    for feed in feeds:
        rows = feed["x"][0, 1:]
        sums += rows.T @ rows
    np.testing.assert_array_equal(hessians["x"], sums / np.float32(15))


def counting_feeds(feeds):
    """(a feeds callable for the statistics passes, the list it appends to on each call)."""
    calls = []

    def counted():
        calls.append(1)
        return iter(feeds)

    return counted, calls


@pytest.mark.parametrize("budget_bytes,passes", [(300, 1), (200, 2)])
def test_collect_hessians_groups_by_budget(matmul_model, budget_bytes, passes):
    # one batch: x is 1 x 6 x 8 fp32 = 192 bytes, y 1 x 6 x 4 = 96 bytes (sizes from shape inference)
    path, weight, feeds = matmul_model
    counted, calls = counting_feeds(feeds)
    hessians = collect_hessians(path, ["x", "y"], counted, budget_bytes=budget_bytes, skip_first_position=False)
    assert len(calls) == 1 + passes  # one peek at the first feed's shapes, then one call per pass
    inputs = np.concatenate([feed["x"][0] for feed in feeds]).astype(np.float64)
    assert_float32_close(hessians["x"], inputs.T @ inputs / len(inputs))


def test_collect_hessians_frees_each_pass_s_session_before_the_next(matmul_model, monkeypatch):
    from tests.helpers.sessions import track_tap_sessions

    path, _, feeds = matmul_model
    alive = track_tap_sessions(monkeypatch)
    collect_hessians(path, ["x", "y"], lambda: iter(feeds), budget_bytes=1, skip_first_position=False)
    assert alive == [0, 0]  # two passes (one tensor each), never two sessions at once


def test_collect_hessians_rejects_unknown_names(matmul_model):
    path, _, feeds = matmul_model
    with pytest.raises(UserError, match="no tensor named 'missing'"):
        collect_hessians(path, ["x", "missing"], lambda: iter(feeds))
    with pytest.raises(UserError, match="no calibration feeds"):
        collect_hessians(path, ["x"], lambda: iter([]))



def test_streamed_groups_start_where_the_previous_group_s_pass_ended(planted_model, monkeypatch):
    """A decoder's inputs in groups of one layer read in order: each pass after the first starts from the values
    the previous one kept (the residual stream, the mask), so no node runs twice; the matrices equal one pass over the whole model's (within float32 sums: ONNX Runtime
    fuses a cut graph a little differently), and a group read out of order starts from the inputs again."""
    from accullm_export.calibration.feeds import llm_feeds, text_windows
    from accullm_export.graph.linear import find_linear_layers
    from accullm_export.runtime import intermediates
    from tests.helpers.models import SAMPLES, SEQ_LEN

    folder, text = planted_model
    path = folder / "model.onnx"
    windows, _ = text_windows(folder, str(text), SAMPLES, SEQ_LEN, 0)
    feeds = llm_feeds(windows, path)
    layers = find_linear_layers(onnx.load(str(path), load_external_data=False))
    channels = {layer.input: layer.in_features for layer in layers if layer.out_features < 200}  # not the head
    whole = collect_hessians(path, list(channels), lambda: iter(feeds))
    ran: list[set[str]] = []
    original = intermediates.IntermediateReader._session

    def recording(self, model):
        ran.append({node.name for node in model.graph.node})
        return original(self, model)

    monkeypatch.setattr(intermediates.IntermediateReader, "_session", recording)
    largest = max(count for count in channels.values())
    store = StreamedHessians(path, channels, lambda: iter(feeds), matrix_bytes=largest * largest * 4)
    assert len(store.groups) >= 4
    for name in channels:
        assert_float32_close(store[name], whole[name])
    assert store.passes == len(store.groups) and store.resumed == len(store.groups) - 1
    assert len(ran) == len(store.groups) and sum(map(len, ran)) == len(set().union(*ran))  # no node twice
    assert_float32_close(store[store.groups[1][0]], whole[store.groups[1][0]])  # out of order: from the inputs
    assert store.resumed == len(store.groups) - 1 and ran[-1] == ran[0] | ran[1]


def test_a_chained_store_lets_go_of_the_shared_weights_no_later_pass_reads(planted_model):
    """Run on the caller's weights, a store read in order holds after each pass only those that a later group's
    pass (starting from the values carried) reads: the rest are freed as soon as the caller lets go of them. A
    group read again out of order loads what it needs from the model's file, with the same matrices."""
    import gc
    import weakref

    from accullm_export.calibration.feeds import llm_feeds, text_windows
    from accullm_export.graph.linear import find_linear_layers
    from accullm_export.runtime.intermediates import IntermediateReader
    from tests.helpers.models import SAMPLES, SEQ_LEN

    folder, text = planted_model
    path = folder / "model.onnx"
    windows, _ = text_windows(folder, str(text), SAMPLES, SEQ_LEN, 0)
    feeds = llm_feeds(windows, path)
    model = onnx.load(str(path))
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer
               if tensor.data_type == TensorProto.FLOAT and np.prod(tensor.dims) >= 1024}
    layers = find_linear_layers(model)
    channels = {layer.input: layer.in_features for layer in layers if layer.out_features < 200}
    whole = collect_hessians(path, list(channels), lambda: iter(feeds))
    largest = max(channels.values())
    store = StreamedHessians(path, channels, lambda: iter(feeds), matrix_bytes=largest * largest * 4)
    store.share(weights)
    alive = {name: weakref.ref(value) for name, value in weights.items()}
    del weights, model
    reader = IntermediateReader(path)
    for number, group in enumerate(store.groups):
        for name in group:
            np.testing.assert_allclose(store[name], whole[name], rtol=1e-5, atol=1e-7)
        gc.collect()
        later = [name for other in store.groups[number + 1:] for name in other]
        carry = dict.fromkeys(store._carry_of(number), np.float32)
        read = {tensor.name for tensor in reader.pruned(later, carry).graph.initializer} if later else set(alive)
        held = {name for name, ref in alive.items() if ref() is not None}
        assert held == set(store._shared) and held <= read
        if number == 0:
            assert held < set(alive)  # the first layer's weights went with its pass
    assert store.resumed == len(store.groups) - 1
    np.testing.assert_allclose(store[store.groups[0][0]], whole[store.groups[0][0]], rtol=1e-5, atol=1e-7)


def test_the_carried_tensors_move_past_a_layer_s_last_projection_to_its_residual_stream(planted_model):
    """Between a group that ends at a down projection's input and one that starts at the next layer's norm, the
    first cut carries that wide input; given the tensors' sizes, the cut moves on to the layer's residual sum."""
    from accullm_export.calibration.feeds import llm_feeds, text_windows
    from accullm_export.calibration.hessian import _elements_per_batch
    from accullm_export.runtime.intermediates import IntermediateReader
    from tests.helpers.models import SAMPLES, SEQ_LEN

    folder, text = planted_model
    reader = IntermediateReader(folder)
    windows, _ = text_windows(folder, str(text), SAMPLES, SEQ_LEN, 0)
    sizes = _elements_per_batch(reader.model, reader.tensor_names(), llm_feeds(windows, folder / "model.onnx")[0],
                                512 << 20)
    before = ["/model/layers.0/input_layernorm/Mul/output_0", "/model/layers.0/mlp/Mul/output_0"]
    after = ["/model/layers.1/input_layernorm/Mul/output_0", "/model/layers.1/mlp/Mul/output_0"]
    first = reader.carried(before, after)
    moved = reader.carried(before, after, size_of=sizes.get)
    assert "/model/layers.0/mlp/Mul/output_0" in first and "/model/layers.0/residual_mlp/Add/output_0" not in first
    assert set(moved) == {name for name in first if "layers.0" not in name} | {
        "/model/layers.0/residual_mlp/Add/output_0"}
    assert sum(sizes[name] for name in moved if name in sizes) < sum(sizes[name] for name in first if name in sizes)


def test_streamed_hessians_hold_one_group_and_equal_the_whole_collection(matmul_model):
    """A matrix budget below both matrices (x: 8 x 8, y: 4 x 4 float32) gives each its own group: read in order
    that is one pass per group, the values equal ``collect_hessians`` of both at once, a group read again after
    another is collected again, and a merged entry costs no pass."""
    path, _, feeds = matmul_model
    counted, calls = counting_feeds(feeds)
    whole = collect_hessians(path, ["x", "y"], lambda: iter(feeds))
    store = StreamedHessians(path, {"x": 8, "y": 4}, counted, matrix_bytes=8 * 8 * 4)
    assert store.groups == [["x"], ["y"]] and list(store) == ["x", "y"] and len(store) == 2 and calls == []
    np.testing.assert_array_equal(store["x"], whole["x"])
    np.testing.assert_array_equal(store["x"], whole["x"])
    assert store.passes == 1
    np.testing.assert_array_equal(store["y"], whole["y"])
    assert store.passes == 2 and len(calls) == 1 + 2  # once, a peek at the first feed's shapes (to size what each
    # pass taps and carries to the next); then the passes
    np.testing.assert_array_equal(store["x"], whole["x"])  # out of order: collected again
    assert store.passes == 3
    merged = store.merged({"rotated": np.eye(2)})
    assert list(merged) == ["x", "y", "rotated"] and "rotated" not in store
    np.testing.assert_array_equal(merged["rotated"], np.eye(2))
    np.testing.assert_array_equal(merged["x"], whole["x"])
    assert merged.passes == 3 and store.get("missing") is None
    together = StreamedHessians(path, {"x": 8, "y": 4}, lambda: iter(feeds))  # the default budget: one group
    assert together.groups == [["x", "y"]]
    np.testing.assert_array_equal(together["y"], whole["y"])
    store.clear()
    np.testing.assert_array_equal(store["y"], whole["y"])
    assert store.passes == 4
    pinned = StreamedHessians(path, {"x": 8, "y": 4}, lambda: iter(feeds), matrix_bytes=8 * 8 * 4, pinned=["y"])
    assert pinned.groups == [["y"], ["x"]] and list(pinned) == ["y", "x"]
    for name in ("y", "x", "y", "x"):  # the pinned matrix stays while the other groups come and go
        np.testing.assert_array_equal(pinned[name], whole[name])
    assert pinned.passes == 2
    pinned.clear()
    np.testing.assert_array_equal(pinned["y"], whole["y"])
    assert pinned.passes == 3
    room = StreamedHessians(path, {"x": 8, "y": 4}, lambda: iter(feeds), pinned=["y"])  # both fit: one pass
    assert room.groups == [["y", "x"]]
    for name in ("y", "x", "y", "x"):
        np.testing.assert_array_equal(room[name], whole[name])
    assert room.passes == 1


def test_a_merged_store_holds_one_group_with_its_store(matmul_model):
    """The store a pass's entries are merged into is the same store seen through a view: when the view collects
    the next group, the group the store held before the merge is let go (a copy kept it, a whole group of
    matrices beside the next), and the store itself then reads that next group without a pass."""
    import gc
    import weakref

    path, _, feeds = matmul_model
    store = StreamedHessians(path, {"x": 8, "y": 4}, lambda: iter(feeds), matrix_bytes=8 * 8 * 4)
    first = weakref.ref(store["x"])
    merged = store.merged({"rotated": np.eye(2)}).merged({"again": np.eye(3)})
    assert list(merged) == ["x", "y", "rotated", "again"] and len(merged) == 4 and merged.passes == 1
    np.testing.assert_array_equal(merged["again"], np.eye(3))
    merged["y"]
    gc.collect()
    assert first() is None and store.passes == 2
    store["y"]
    assert store.passes == 2


def test_streamed_hessians_hand_over_kept_values_from_their_first_pass(matmul_model):
    """A kept tensor's values (every position of every feed, stacked) come from the first pass a group makes:
    reading them, then the matrices, costs one pass; each group's pass after the first taps them no more."""
    path, weight, feeds = matmul_model
    counted, calls = counting_feeds(feeds)
    whole = collect_hessians(path, ["x", "y"], lambda: iter(feeds))
    expected = np.concatenate([feed["x"] @ weight for feed in feeds])
    store = StreamedHessians(path, {"x": 8, "y": 4}, counted, kept=["y"])
    assert store.kept == ("y",) and calls == []
    assert_float32_close(store.source_values("y"), expected)
    assert store.passes == 1
    np.testing.assert_array_equal(store["x"], whole["x"])
    np.testing.assert_array_equal(store["y"], whole["y"])
    assert store.passes == 1 and len(calls) == 2
    with pytest.raises(KeyError):
        store.source_values("y")  # handed over once
    with pytest.raises(KeyError):
        store.source_values("x")  # never kept
    split = StreamedHessians(path, {"x": 8, "y": 4}, lambda: iter(feeds), matrix_bytes=8 * 8 * 4, kept=["out"])
    np.testing.assert_array_equal(split["y"], whole["y"])  # the group read first taps the kept tensor
    assert_float32_close(split.source_values("out"), np.maximum(expected, 0))
    assert split.passes == 1
    alone = StreamedHessians(path, {}, lambda: iter(feeds), kept=["x"])
    np.testing.assert_array_equal(alone.source_values("x"), np.concatenate([feed["x"] for feed in feeds]))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_gptq_by_parts_of_the_columns_is_the_whole_problem(asymmetric):
    """Output columns share H and nothing else, so solving them a few columns at a time (what keeps a
    vocabulary-sized head's float64 working copy small) gives the same integers as one pass over all of them."""
    from accullm_export.quant.gptq import _gptq, gptq_grid

    weight, hessian = correlated_problem(40, 24, seed=9)
    hessian[11] = hessian[:, 11] = 0.0  # a dead input too
    grid = gptq_grid(weight, hessian, 4, 16, exclude=[3], asymmetric=True) if asymmetric else None
    whole = _gptq(weight, hessian, 4, 16, [3], 0.01, 8, True, True, grid=grid, columns=24)
    for columns in (1, 5, 7):
        parts = _gptq(weight, hessian, 4, 16, [3], 0.01, 8, True, True, grid=grid, columns=columns)
        np.testing.assert_array_equal(parts[0], whole[0])
        np.testing.assert_array_equal(parts[1], whole[1])
    assert whole[0].any() and not whole[0][[3, 11]].any()


def test_gptq_s_factor_holds_one_float64_matrix_of_the_inputs():
    """GPTQ's working memory on a wide layer is one [in, in] float64 matrix (the factor is made in place) and
    blocks of it: NumPy's allocations, counted by tracemalloc, stay under two such matrices for a layer with
    few outputs (a Cholesky and an inverse each beside their input would be three or more)."""
    import tracemalloc

    size = 1024
    rng = np.random.default_rng(5)
    factors = rng.standard_normal((size, 64)).astype(np.float32)
    hessian = factors @ factors.T / 64 + np.eye(size, dtype=np.float32)
    weight = rng.standard_normal((size, 8)).astype(np.float32)
    tracemalloc.start()
    try:
        values, _ = gptq_quantize(weight, hessian, 4, 128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values.any() and peak < 2 * size * size * 8


@pytest.mark.parametrize("size", [7, 600])  # 600: inverted by halves (299 + 300 rows below them, 150 + 150 ...)
def test_the_inverse_cholesky_factor_is_upper_and_squares_to_the_damped_inverse(size):
    """GPTQ's U: upper triangular with a positive diagonal and U^T U = (H + damp * mean(diag H) * I)^-1, checked
    against NumPy's general inverse, on an ill-conditioned H (one input 40x the others)."""
    from accullm_export.quant.gptq import _inverse_cholesky_upper

    inputs = np.random.default_rng(size).normal(size=(2 * size, size))
    inputs[:, 1] *= 40.0
    hessian = inputs.T @ inputs / len(inputs)
    upper = _inverse_cholesky_upper(hessian, 0.01, reference=float(np.mean(np.diag(hessian))))
    damped = hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(size)
    assert np.array_equal(upper, np.triu(upper)) and (np.diag(upper) > 0).all()
    expected = np.linalg.inv(damped)
    np.testing.assert_allclose(upper.T @ upper, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
