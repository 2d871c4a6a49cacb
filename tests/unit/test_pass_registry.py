"""The pass registry: passes are discovered from the package, each with a typed config whose fields the
pipeline can fill from PassData, and what a pass produces reaches the passes after it."""

from __future__ import annotations

import dataclasses
import pkgutil

import numpy as np
import pytest

from accullm_export.graph import passes
from accullm_export.graph.pass_data import PassData, PassResult
from tests.helpers.graphs import one_layer_graph, plan_for


def test_every_module_of_the_package_registers_a_pass_with_a_typed_config():
    modules = {module.name for module in pkgutil.iter_modules(passes.__path__)}
    passes.discover()
    assert modules == set(passes.PASSES)  # each module registers its pass under its own name
    shared = {field.name for field in dataclasses.fields(PassData)}
    for name in modules:
        config = passes.pass_config(name)
        if config is None:
            continue
        assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, name
        # configured with the sparse plans, and with the TensorRT version's missing ops, not from the recipe
        if name not in ("skip_sparse_neurons", "lower_attention"):
            assert {field.name for field in dataclasses.fields(config)} <= shared, name


def test_a_second_pass_under_one_name_and_unknown_products_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        passes.register("isolate_outliers")(lambda graph, config: graph)
    with pytest.raises(ValueError, match="may produce"):
        PassResult(graph=None, produced={"notes": {}})
    with pytest.raises(KeyError, match="unknown graph pass"):
        passes.get_pass("no_such_pass")


def test_what_a_pass_produces_reaches_the_next_and_nothing_is_shared():
    """rotate_inputs hands the rotated input's statistics and its plan on; the data it was given is unchanged."""
    from accullm_export.graph.pipeline import run_passes

    weight = (np.random.default_rng(5).standard_normal((32, 8)) * 0.1).astype(np.float32)
    plan = dataclasses.replace(plan_for(weight, "int4", block=16, outliers=(3,)), rotation=16)
    statistics = {"x": {"second_moment": np.linspace(1.0, 2.0, 32), "absmax": np.ones(32)}}
    data = PassData(plans={plan.node: plan}, statistics=statistics, scale_search=True)
    graph, reports, after = run_passes(one_layer_graph(weight), ["isolate_outliers", "rotate_inputs",
                                                                  "quantize_weights"], data)
    rotated = after.plans[plan.node].input
    assert rotated != "x" and rotated in after.statistics and set(data.statistics) == {"x"}
    assert data.plans[plan.node].input == "x"
    assert [report.name for report in reports] == ["isolate_outliers", "rotate_inputs", "quantize_weights"]
    assert any("rotated" in note for note in reports[1].notes)
