"""Tests for kvfx.spec: loading, round trips, resolution, and one test per class of bad input."""

import dataclasses
import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.spec import (
    EVICT_METHODS,
    QUANTIZE_METHODS,
    EvictH2O,
    EvictKeyformer,
    EvictNone,
    EvictRazor,
    EvictSnapKV,
    EvictWindow,
    Plan,
    Policy,
    QuantizeGEAR,
    QuantizeKIVI,
    QuantizeNone,
    Spec,
    SpecError,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(glob.glob(str(REPO / "examples" / "specs" / "*.yaml")))

H2O = {"method": "h2o", "budget": 0.2, "recent": 0.5}
KIVI = {"method": "kivi", "bits": 4, "group": 32, "residual": 128}
NONE = {"method": "none"}


def spec_dict(default=None, overrides=None):
    data = {"version": 1, "default": default or {}}
    if overrides is not None:
        data["overrides"] = overrides
    return data


def load_error(tmp_path, text, name="spec.yaml"):
    """Write `text` to tmp_path/name, load it, and return (file name, error message)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        Spec.load(path)
    return str(path), str(caught.value)


def dict_error(data):
    with pytest.raises(SpecError) as caught:
        Spec.from_dict(data, source="spec.yaml")
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# Loading, defaults and round trips
# ---------------------------------------------------------------------------------------------


def test_minimal_spec_is_identity_and_methods_have_documented_defaults():
    assert Spec.from_dict({"version": 1}) == Spec.identity()
    assert Spec.identity().default == Policy(evict=EvictNone(), quantize=QuantizeNone())
    assert EvictH2O() == EvictH2O(budget=0.2, recent=0.5)
    assert EvictKeyformer().tau == (1.0, 2.0) and EvictKeyformer().seed == 0
    window = EvictWindow(budget=64)
    assert (window.sink, window.positions) == (4, "original")
    snap = EvictSnapKV(budget=0.3)
    assert (snap.window, snap.pool, snap.pooling) == (32, 7, "max")
    razor = EvictRazor(profile="p.json")
    assert (razor.sink, razor.min_window, razor.compress_ratio, razor.compensate) == (4, 256, 5.0, True)
    assert (razor.echo_ratio, razor.induction_ratio) == (0.01, 0.14)
    assert (QuantizeKIVI().bits, QuantizeKIVI().group, QuantizeKIVI().residual) == (4, 32, 128)
    gear = QuantizeGEAR()
    assert (gear.bits, gear.rank, gear.outliers, gear.prefill_rank) == (4, 2, 0.02, 4)


def test_method_names_are_class_attributes_and_registries():
    assert list(EVICT_METHODS) == ["none", "window", "h2o", "keyformer", "snapkv", "razor"]
    assert list(QUANTIZE_METHODS) == ["none", "kivi", "gear"]
    assert EvictH2O.method == "h2o" and QuantizeGEAR.method == "gear"
    assert all(cls.method == name for name, cls in {**EVICT_METHODS, **QUANTIZE_METHODS}.items())


def test_budget_int_is_a_count_and_float_is_a_fraction():
    assert EvictH2O(budget=1, recent=0).budget == 1 and isinstance(EvictH2O(budget=1, recent=0).budget, int)
    assert isinstance(EvictH2O(budget=1.0).budget, float)
    integral = EvictH2O(budget=512.0, recent=8)
    assert integral.budget == 512 and isinstance(integral.budget, int)


def test_configs_are_frozen_and_hashable():
    spec = Spec.identity()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.version = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.default.evict.budget = 3
    assert len({Policy(), Policy(), Policy(evict=EvictH2O())}) == 2


def test_source_is_not_part_of_equality():
    a = Spec.from_dict({"version": 1}, source="a.yaml")
    b = Spec.from_dict({"version": 1})
    assert a.source == "a.yaml" and b.source is None
    assert a == b and hash(a) == hash(b)
    assert "source" not in a.to_dict()


def test_selectors_are_stored_in_canonical_form():
    spec = Spec.from_dict(
        spec_dict(overrides=[{"layers": [0, "2, 4 - 6", -1], "heads": " all ", "evict": NONE},
                             {"layers": 3, "heads": "-2--1", "evict": NONE},
                             {"layers": "5-5", "evict": NONE}])
    )
    assert [(o.layers, o.heads) for o in spec.overrides] == [("0,2,4-6,-1", "all"), ("3", "-2--1"), ("5", "all")]


EXAMPLE_LIKE = spec_dict(
    default={"evict": {"method": "window", "budget": 1.0, "sink": 0}, "quantize": {"method": "gear", "bits": 2}},
    overrides=[
        {"layers": "0-1", "evict": H2O},
        {"layers": [0, -1], "heads": [0, 3], "quantize": KIVI},
        {"layers": "1", "heads": "all", "evict": {"method": "razor", "profile": "true"}},
    ],
)


def test_round_trip_through_dict_yaml_and_json_text():
    spec = Spec.from_dict(EXAMPLE_LIKE)
    assert Spec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["overrides"][0] == {"layers": "0-1", "heads": "all", "evict": H2O}  # unset part omitted
    assert Spec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    assert Spec.from_dict(json.loads(spec.to_json())) == spec
    # A fraction of 1.0 must not turn into the token count 1 on the way through text.
    assert yaml.safe_load(spec.to_yaml())["default"]["evict"]["budget"] == 1.0
    assert isinstance(json.loads(spec.to_json())["default"]["evict"]["budget"], float)
    # A profile path that looks like a YAML boolean must stay a string.
    assert Spec.from_dict(yaml.safe_load(spec.to_yaml())).overrides[2].evict.profile == "true"


@pytest.mark.parametrize("name", ["out.yaml", "out.yml", "out.json"])
def test_round_trip_through_files(tmp_path, name):
    spec = Spec.from_dict(EXAMPLE_LIKE)
    path = tmp_path / name
    spec.dump(path)
    loaded = Spec.load(path)
    assert loaded == spec
    assert loaded.source == str(path)
    if name.endswith(".json"):
        json.loads(path.read_text())  # really JSON, chosen by the extension


# Hypothesis: random valid specs -------------------------------------------------------------

fractions = st.floats(min_value=0, max_value=1, exclude_min=True)
counts = st.integers(1, 10**6)
budgets = st.one_of(fractions, counts)
open_unit = st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True)


@st.composite
def budget_and_recent(draw):
    budget = draw(budgets)
    limit = budget if isinstance(budget, int) else 10**6
    return budget, draw(st.one_of(st.floats(0, 1), st.integers(0, limit)))


@st.composite
def evict_configs(draw):
    method = draw(st.sampled_from(list(EVICT_METHODS)))
    if method == "none":
        return {"method": "none"}
    if method == "window":
        budget = draw(budgets)
        sink = draw(st.integers(0, budget - 1 if isinstance(budget, int) else 100))
        return {"method": method, "budget": budget, "sink": sink,
                "positions": draw(st.sampled_from(["original", "compact"]))}
    if method in ("h2o", "keyformer"):
        budget, recent = draw(budget_and_recent())
        config = {"method": method, "budget": budget, "recent": recent}
        if method == "keyformer":
            positive = st.floats(min_value=1e-3, max_value=100)
            config.update(tau=[draw(positive), draw(positive)], seed=draw(st.integers(-(2**31), 2**31)))
        return config
    if method == "snapkv":
        budget = draw(st.one_of(fractions, st.integers(2, 10**6)))
        window = draw(st.integers(1, budget - 1 if isinstance(budget, int) else 512))
        return {"method": method, "budget": budget, "window": window,
                "pool": 2 * draw(st.integers(0, 10)) + 1, "pooling": draw(st.sampled_from(["max", "avg"]))}
    return {
        "method": "razor",
        "profile": draw(st.from_regex(r"[A-Za-z0-9_./-]{1,30}", fullmatch=True)),
        "sink": draw(st.integers(0, 64)),
        "min_window": draw(st.integers(1, 4096)),
        "compress_ratio": draw(st.floats(min_value=1, max_value=1e4)),
        "compensate": draw(st.booleans()),
        "echo_ratio": draw(open_unit),
        "induction_ratio": draw(open_unit),
    }


@st.composite
def quantize_configs(draw):
    method = draw(st.sampled_from(list(QUANTIZE_METHODS)))
    if method == "none":
        return {"method": "none"}
    group = draw(st.integers(1, 256))
    config = {"method": method, "group": group, "residual": group * draw(st.integers(1, 16))}
    if method == "kivi":
        return {**config, "bits": draw(st.sampled_from([2, 4, 8]))}
    return {**config, "bits": draw(st.sampled_from([2, 4])), "rank": draw(st.integers(1, 64)),
            "outliers": draw(st.floats(0, 0.5, exclude_max=True)), "prefill_rank": draw(st.integers(1, 64))}


selector_terms = st.one_of(
    st.just("all"),
    st.integers(-64, 63),
    st.integers(0, 63).flatmap(lambda a: st.integers(a, 63).map(lambda b: f"{a}-{b}")),
    st.integers(-64, -1).flatmap(lambda a: st.integers(a, -1).map(lambda b: f"{a}-{b}")),
)
selectors = st.one_of(selector_terms, st.lists(selector_terms, min_size=1, max_size=4))


@st.composite
def overrides(draw):
    override = {"layers": draw(selectors)}
    if draw(st.booleans()):
        override["heads"] = draw(selectors)
    parts = draw(st.sampled_from([("evict",), ("quantize",), ("evict", "quantize")]))
    if "evict" in parts:
        override["evict"] = draw(evict_configs())
    if "quantize" in parts:
        override["quantize"] = draw(quantize_configs())
    return override


spec_dicts = st.builds(
    lambda evict, quantize, extra: spec_dict({"evict": evict, "quantize": quantize}, extra),
    evict_configs(), quantize_configs(), st.lists(overrides(), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(spec_dicts)
def test_random_valid_specs_round_trip(data):
    spec = Spec.from_dict(data)
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    assert Spec.from_dict(json.loads(spec.to_json())) == spec


@given(st.one_of(st.floats(allow_nan=True), st.integers(-10, 10**6)))
def test_budget_accepts_exactly_fractions_and_counts(value):
    valid = (isinstance(value, int) and value >= 1) or (
        isinstance(value, float) and (0 < value <= 1 or (value > 1 and value.is_integer()))
    )
    data = spec_dict({"evict": {"method": "snapkv", "budget": value, "window": 1}})
    if valid:
        assert Spec.from_dict(data).default.evict.budget == value
    else:
        assert "default.evict.budget" in dict_error(data)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats() | st.sampled_from(
        ["none", "h2o", "kivi", "all", "0-1", "method", "budget", "evict", "quantize", "layers"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["version", "default", "overrides", "evict", "quantize", "method", "budget",
                         "layers", "heads", "bits", "group", "residual", "recent", "x"]), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_like.map(lambda d: {"version": 1, **d} if isinstance(d, dict) else d))
def test_arbitrary_input_gives_a_spec_or_a_one_line_per_problem_spec_error(data):
    try:
        Spec.from_dict(data, source="fuzz.yaml")
    except SpecError as error:
        assert all(line.startswith("fuzz.yaml: ") for line in str(error).splitlines())


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def test_default_applies_to_every_layer_and_head():
    plan = Spec.from_dict(spec_dict({"evict": H2O, "quantize": KIVI})).resolve(3, 2)
    expected = Policy(evict=EvictH2O(), quantize=QuantizeKIVI())
    assert isinstance(plan, Plan) and (plan.num_layers, plan.num_kv_heads) == (3, 2)
    assert all(plan.policy(layer, head) == expected for layer in range(3) for head in range(2))
    assert plan.layer_policies(1) == (expected, expected)
    assert plan.methods() == {("h2o", "kivi")}


def test_later_overrides_win():
    spec = Spec.from_dict(spec_dict(overrides=[
        {"layers": "all", "evict": H2O},
        {"layers": "1-2", "evict": {"method": "window", "budget": 16}},
        {"layers": 2, "evict": NONE},
    ]))
    plan = spec.resolve(4, 1)
    assert [plan.policy(layer, 0).evict.method for layer in range(4)] == ["h2o", "window", "none", "h2o"]


def test_partial_override_keeps_the_other_part():
    spec = Spec.from_dict(spec_dict({"evict": H2O, "quantize": KIVI}, [
        {"layers": 0, "quantize": NONE},
        {"layers": 0, "evict": {"method": "window", "budget": 16}},
    ]))
    plan = spec.resolve(2, 1)
    assert plan.policy(0, 0) == Policy(evict=EvictWindow(budget=16), quantize=QuantizeNone())
    assert plan.policy(1, 0) == Policy(evict=EvictH2O(), quantize=QuantizeKIVI())


def test_heads_select_kv_heads_within_selected_layers():
    spec = Spec.from_dict(spec_dict(overrides=[{"layers": "1", "heads": [0, "-1"], "quantize": KIVI}]))
    plan = spec.resolve(2, 4)
    assert [p.quantize.method for p in plan.layer_policies(1)] == ["kivi", "none", "none", "kivi"]
    assert {p.quantize.method for p in plan.layer_policies(0)} == {"none"}
    assert plan.methods() == {("none", "none"), ("none", "kivi")}


def test_negative_indices_and_ranges_count_from_the_end():
    spec = Spec.from_dict(spec_dict(overrides=[
        {"layers": "-2--1", "evict": H2O},
        {"layers": "0,-5", "evict": {"method": "window", "budget": 8}},
        {"layers": "2--3", "quantize": KIVI},
    ]))
    plan = spec.resolve(6, 1)
    assert [plan.policy(layer, 0).evict.method for layer in range(6)] == ["window", "window", "none", "none", "h2o", "h2o"]
    assert [plan.policy(layer, 0).quantize.method for layer in range(6)] == ["none", "none", "kivi", "kivi", "none", "none"]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_resolve_matches_last_matching_override(data):
    """Oracle: a cell's evict is that of the LAST override selecting it and setting evict, else the default."""
    num_layers, num_heads = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    choices = [None, NONE, H2O, {"method": "window", "budget": 8}]
    raw = data.draw(st.lists(st.fixed_dictionaries({
        "layers": st.lists(st.integers(-num_layers, num_layers - 1), min_size=1, max_size=3),
        "heads": st.lists(st.integers(-num_heads, num_heads - 1), min_size=1, max_size=3),
        "evict": st.sampled_from(choices),
        "quantize": st.sampled_from([KIVI]),
    }), max_size=5))
    entries = [{key: value for key, value in entry.items() if value is not None} for entry in raw]
    plan = Spec.from_dict(spec_dict(overrides=entries)).resolve(num_layers, num_heads)
    for layer in range(num_layers):
        for head in range(num_heads):
            matching = [e for e in entries if layer in {i % num_layers for i in e["layers"]}
                        and head in {i % num_heads for i in e["heads"]} and "evict" in e]
            expected = matching[-1]["evict"]["method"] if matching else "none"
            assert plan.policy(layer, head).evict.method == expected


def test_describe_groups_identical_layers_and_lists_differing_heads():
    spec = Spec.from_dict(spec_dict({"evict": H2O}, [
        {"layers": "2", "heads": "0", "quantize": KIVI},
        {"layers": "3", "evict": NONE},
    ]), source="mix.yaml")
    plan = spec.resolve(4, 2)
    text = plan.describe()
    assert str(plan) == text
    assert text.splitlines()[0] == "kvfx plan: 4 layers x 2 KV heads (mix.yaml)"
    assert "  layers 0-1: evict=h2o(budget=0.2, recent=0.5) quantize=none" in text
    assert "    head 0: evict=h2o(budget=0.2, recent=0.5) quantize=kivi(bits=4, group=32, residual=128)" in text
    assert "    head 1: evict=h2o(budget=0.2, recent=0.5) quantize=none" in text
    assert "  layer 3: evict=none quantize=none" in text
    assert len(text.splitlines()) == 6  # header, layers 0-1, layer 2 + two head lines, layer 3


def test_plan_indexing_errors_are_clear():
    plan = Spec.identity().resolve(2, 2)
    with pytest.raises(IndexError, match="layer 2 is out of range for a plan of 2 layers"):
        plan.policy(2, 0)
    with pytest.raises(IndexError, match="KV head 5"):
        plan.policy(0, 5)
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1"):
        Spec.identity().resolve(2, 0)


def test_summary_names_file_methods_and_override_count():
    assert Spec.identity().summary() == "evict=none quantize=none"
    spec = Spec.from_dict(spec_dict({"evict": H2O}, [{"layers": 0, "evict": NONE}]), source="dir/h2o.yaml")
    assert spec.summary() == "h2o.yaml: evict=h2o quantize=none (+1 override)"


def test_coerce_accepts_none_paths_dicts_and_specs(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("version: 1\ndefault: {evict: {method: h2o}}\n")
    spec = Spec.load(path)
    assert Spec.coerce(None) == Spec.identity()
    assert Spec.coerce(path) == spec and Spec.coerce(str(path)) == spec
    assert Spec.coerce({"version": 1, "default": {"evict": {"method": "h2o"}}}) == spec
    assert Spec.coerce(spec) is spec
    with pytest.raises(TypeError, match="must be None, a path .* not int"):
        Spec.coerce(3)


# ---------------------------------------------------------------------------------------------
# Bad input: one test per class, each checking file, key path, value and what is allowed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [("-0.5", "-0.5"), ("0", "0"), ("1.5", "1.5"), ("'20%'", "'20%'")])
def test_bad_budget(tmp_path, value, shown):
    file, message = load_error(tmp_path, f"version: 1\ndefault:\n  evict: {{method: window, budget: {value}}}\n")
    assert message == f"{file}: default.evict.budget: {shown} is not a fraction in (0, 1] or a token count >= 1"


def test_unknown_method(tmp_path):
    text = "version: 1\noverrides:\n  - {layers: 0, evict: {method: none}}\n  - {layers: 1, evict: {method: h3o}}\n"
    file, message = load_error(tmp_path, text)
    assert message == f"{file}: overrides[1].evict.method: 'h3o' is not one of none, window, h2o, keyformer, snapkv, razor"
    message = dict_error(spec_dict({"quantize": {"method": "int4"}}))
    assert message == "spec.yaml: default.quantize.method: 'int4' is not one of none, kivi, gear"


def test_missing_method_and_missing_required_parameter():
    assert dict_error(spec_dict({"evict": {"budget": 4}})) == (
        "spec.yaml: default.evict.method: missing (one of none, window, h2o, keyformer, snapkv, razor)"
    )
    assert dict_error(spec_dict({"evict": {"method": "snapkv"}})) == (
        "spec.yaml: default.evict.budget: missing (required by snapkv)"
    )


def test_unknown_key(tmp_path):
    file, message = load_error(tmp_path, "version: 1\ndefault:\n  evict: {method: window, budget: 8, colour: red}\n")
    assert message == f"{file}: default.evict.colour: unknown key (allowed: method, sink, budget, positions)"
    assert dict_error({"version": 1, "defaults": {}}) == (
        "spec.yaml: defaults: unknown key (allowed: version, default, overrides)"
    )
    assert dict_error(spec_dict(overrides=[{"layers": 0, "head": 1, "evict": NONE}])) == (
        "spec.yaml: overrides[0].head: unknown key (allowed: layers, heads, evict, quantize)"
    )


def test_bad_bits():
    assert dict_error(spec_dict({"quantize": {"method": "kivi", "bits": 3}})) == (
        "spec.yaml: default.quantize.bits: 3 is not one of 2, 4, 8 (kivi)"
    )
    assert dict_error(spec_dict({"quantize": {"method": "gear", "bits": 8}})) == (
        "spec.yaml: default.quantize.bits: 8 is not one of 2, 4 (gear)"
    )
    assert "4.0 is not one of 2, 4, 8" in dict_error(spec_dict({"quantize": {"method": "kivi", "bits": 4.0}}))


def test_residual_not_a_multiple_of_group():
    message = dict_error(spec_dict({"quantize": {"method": "gear", "group": 32, "residual": 100}}))
    assert message == "spec.yaml: default.quantize.residual: 100 is not a multiple of group (32)"


@pytest.mark.parametrize("value", [0.5, -0.01, "0.1"])
def test_outliers_out_of_range(value):
    message = dict_error(spec_dict({"quantize": {"method": "gear", "outliers": value}}))
    assert message == f"spec.yaml: default.quantize.outliers: {value!r} is not a number in [0, 0.5)"


@pytest.mark.parametrize("method", ["h2o", "keyformer"])
def test_recent_count_above_budget_count(method):
    message = dict_error(spec_dict({"evict": {"method": method, "budget": 100, "recent": 200}}))
    assert message == "spec.yaml: default.evict.recent: 200 is not <= budget (100 tokens)"
    # A count against a fraction cannot be checked without the prompt length, so it is allowed.
    assert Spec.from_dict(spec_dict({"evict": {"method": method, "budget": 0.5, "recent": 200}}))


def test_window_and_sink_must_stay_below_a_count_budget():
    assert dict_error(spec_dict({"evict": {"method": "snapkv", "budget": 32}})) == (
        "spec.yaml: default.evict.window: 32 is not < budget (32 tokens)"
    )
    assert dict_error(spec_dict({"evict": {"method": "window", "budget": 4}})) == (
        "spec.yaml: default.evict.sink: 4 is not < budget (4 tokens)"
    )


def test_bad_pooling():
    message = dict_error(spec_dict({"evict": {"method": "snapkv", "budget": 0.5, "pooling": "mean"}}))
    assert message == "spec.yaml: default.evict.pooling: 'mean' is not one of max, avg"
    assert "pool: 4 is not an odd int >= 1" in dict_error(spec_dict({"evict": {"method": "snapkv", "budget": 0.5, "pool": 4}}))


@pytest.mark.parametrize("selector", ["0-x", "", "1,,2", "3-1", "-1--3", [], [[0]], True, 1.5])
def test_bad_layer_selector_syntax(selector):
    message = dict_error(spec_dict(overrides=[{"layers": selector, "evict": NONE}]))
    assert message.startswith(f"spec.yaml: overrides[0].layers: {selector!r} is not a layer selector (")
    assert ("'0-3'" in message) or ("is empty" in message)


def test_out_of_range_layer(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("version: 1\noverrides:\n  - {layers: all, evict: {method: h2o}}\n  - {layers: '30-32', evict: {method: none}}\n")
    spec = Spec.load(path)
    assert spec.resolve(33, 1)  # fine for a model with 33 layers
    with pytest.raises(SpecError) as caught:
        spec.resolve(32, 8)
    assert str(caught.value) == (
        f"{path}: overrides[1].layers: '30-32' selects layer 32, but the model has 32 layers (valid: 0 to 31, or -32 to -1)"
    )
    with pytest.raises(SpecError, match=r"<dict>: overrides\[0\].layers: '-3' selects layer -3, but the model has 2 layers"):
        Spec.from_dict(spec_dict(overrides=[{"layers": -3, "evict": NONE}])).resolve(2, 1)
    with pytest.raises(SpecError, match=r"'-1-3' selects no layers in a model with 8 layers"):
        Spec.from_dict(spec_dict(overrides=[{"layers": "-1-3", "evict": NONE}])).resolve(8, 1)


def test_out_of_range_head():
    spec = Spec.from_dict(spec_dict(overrides=[{"layers": 0, "heads": [0, 8], "evict": NONE}]), source="spec.yaml")
    with pytest.raises(SpecError) as caught:
        spec.resolve(4, 8)
    assert str(caught.value) == (
        "spec.yaml: overrides[0].heads: '0,8' selects KV head 8, but the model has 8 KV heads (valid: 0 to 7, or -8 to -1)"
    )


@pytest.mark.parametrize("version", ["2", "'1'", "1.0"])
def test_bad_version(tmp_path, version):
    file, message = load_error(tmp_path, f"version: {version}\ncolour: red\n")
    shown = repr(yaml.safe_load(version))
    assert message == f"{file}: version: {shown} is not a supported version (supported versions: 1)"


def test_missing_version(tmp_path):
    file, message = load_error(tmp_path, "default: {evict: {method: none}}\n")
    assert message == f"{file}: version: missing (supported versions: 1)"


def test_malformed_yaml(tmp_path):
    file, message = load_error(tmp_path, "version: 1\ndefault:\n  evict: {method: h2o\n  quantize: x\n")
    assert message.startswith(f"{file}: line 4, column ")
    assert "malformed YAML" in message and "\n" not in message


def test_duplicate_keys_are_errors(tmp_path):
    file, message = load_error(tmp_path, "version: 1\ndefault:\n  evict: {method: h2o}\n  evict: {method: none}\n")
    assert message == f"{file}: line 4, column 3: malformed YAML: duplicate key 'evict'"
    file, message = load_error(tmp_path, '{"version": 1, "version": 1}', name="spec.json")
    assert message == f"{file}: malformed JSON: duplicate key 'version'"


def test_malformed_json(tmp_path):
    file, message = load_error(tmp_path, '{\n  "version": 1,\n}\n', name="spec.json")
    assert message.startswith(f"{file}: line 3, column 1: malformed JSON: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        Spec.load(path)
    assert str(caught.value) == f"{path}: no such spec file"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text("version = 1\n")
    with pytest.raises(SpecError, match=r"spec.toml: unsupported spec file extension '.toml' \(allowed: .yaml, .yml, .json\)"):
        Spec.load(path)
    with pytest.raises(SpecError, match="unsupported spec file extension"):
        Spec.identity().dump(path)


@pytest.mark.parametrize("text, shown", [("- 1\n- 2\n", "[1, 2]"), ("just text\n", "'just text'"), ("", "None")])
def test_wrong_top_level_type(tmp_path, text, shown):
    file, message = load_error(tmp_path, text)
    assert message == f"{file}: top level: {shown} is not a mapping (allowed keys: version, default, overrides)"


def test_wrong_nested_types():
    assert dict_error(spec_dict({"evict": "h2o"})) == "spec.yaml: default.evict: 'h2o' is not a mapping with a method key"
    assert dict_error({"version": 1, "overrides": {"layers": 0}}) == "spec.yaml: overrides: {'layers': 0} is not a list"
    assert dict_error(spec_dict(overrides=[{"layers": 0}])) == (
        "spec.yaml: overrides[0]: sets neither evict nor quantize (give at least one)"
    )
    assert dict_error(spec_dict({"evict": {"method": "razor", "profile": "p", "compensate": "yes"}})) == (
        "spec.yaml: default.evict.compensate: 'yes' is not true or false"
    )


def test_every_problem_is_reported_on_its_own_line_without_pydantic_text():
    data = spec_dict({"evict": {"method": "window", "budget": 2.5}, "quantize": {"method": "kivi", "bits": 3}},
                     [{"layers": "x", "evict": NONE}])
    lines = dict_error(data).splitlines()
    assert lines == [
        "spec.yaml: default.evict.budget: 2.5 is not a fraction in (0, 1] or a token count >= 1",
        "spec.yaml: default.quantize.bits: 3 is not one of 2, 4, 8 (kivi)",
        "spec.yaml: overrides[0].layers: 'x' is not a layer selector "
        "(use all, 3, '0-3', '-1', '-2--1', '0,2,4-6' or a list of those; ranges are inclusive)",
    ]
    assert not any("pydantic" in line or "Input should" in line for line in lines)


def test_direct_construction_raises_spec_error():
    with pytest.raises(SpecError, match=r"^<EvictH2O>: budget: -1 is not a fraction in \(0, 1\] or a token count >= 1$"):
        EvictH2O(budget=-1)
    with pytest.raises(SpecError, match=r"^<QuantizeKIVI>: colour: unknown key \(allowed: method, bits, group, residual\)$"):
        QuantizeKIVI(colour=1)
    with pytest.raises(SpecError, match=r"^<EvictSnapKV>: window: 64 is not < budget \(64 tokens\)$"):
        EvictSnapKV(budget=64, window=64)


# ---------------------------------------------------------------------------------------------
# Examples and import hygiene
# ---------------------------------------------------------------------------------------------


def test_examples_exist():
    names = {os.path.basename(path) for path in EXAMPLES}
    assert {"full.yaml", "window.yaml", "h2o.yaml", "keyformer.yaml", "snapkv.yaml", "razor.yaml",
            "kivi.yaml", "gear.yaml", "h2o_kivi.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_spec_loads_and_resolves(path):
    spec = Spec.load(path)
    assert Spec.from_dict(spec.to_dict()) == spec
    assert spec.resolve(num_layers=4, num_kv_heads=2).num_layers == 4
    stem = os.path.basename(path)[: -len(".yaml")]
    used = {method for pair in spec.resolve(4, 2).methods() for method in pair}
    assert set(stem.split("_")) <= used | {"full"}


def test_full_example_is_identity():
    assert Spec.load(REPO / "examples" / "specs" / "full.yaml") == Spec.identity()


def test_importing_spec_does_not_import_torch():
    code = "import sys, kvfx.spec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
