import pytest

from qcompile.errors import ConfigError
from qcompile.overrides import OverrideMap
from qcompile.recipe import Recipe, builtin_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_yaml_round_trip(name, tmp_path):
    r = load_recipe(name)
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    back = load_recipe(p)
    assert back.to_dict() == r.to_dict()
    assert [type(x) for x in back.build_passes()] == [type(x) for x in r.build_passes()]


def test_config_values_survive_round_trip():
    r = Recipe.from_dict({"name": "x", "calibration": {"max_samples": 7}, "passes": [
        {"name": "insert_qdq", "activation_dtype": "int8", "activation_symmetric": True,
         "observer": "percentile", "observer_params": {"percentile": 99.9},
         "overrides": {"re:.*": {"quantize": False}}}]})
    back = Recipe.from_yaml(r.to_yaml())
    p = back.build_passes()[0]
    assert p.config.activation_dtype.value == "int8" and p.config.activation_symmetric is True
    assert p.config.observer_params == {"percentile": 99.9} and back.calibration.max_samples == 7


@pytest.mark.parametrize("data,match", [
    ({"name": "x", "passes": ["no_such_pass"]}, "unknown pass"),
    ({"name": "x", "passes": []}, "non-empty"),
    ({"name": "x", "passes": ["fold_constants"], "qcompile_recipe": 2}, "version"),
    ({"name": "x", "passes": ["fold_constants"], "calibration": {"samples": 3}}, "unknown key"),
    ({"name": "x", "passes": [{"name": "insert_qdq", "overrides": {"a": {"quantise": False}}}]}, "override key"),
    ({"name": "x", "passes": [{"name": "insert_qdq", "overrides": {"re:(": {"quantize": False}}}]}, "bad pattern"),
    ({"name": "x", "passes": [{"name": "smooth_quant", "alpha": 2}]}, "alpha"),
])
def test_invalid_recipes(data, match):
    with pytest.raises(ConfigError, match=match):
        Recipe.from_dict(data)


def test_invalid_yaml_and_unknown_name(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("passes: [a, b\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("w9a9")


def test_override_precedence_exact_then_pattern_then_default():
    m = OverrideMap.build({"re:conv.*": {"quantize": False}, "conv1": {"quantize": True},
                           "re:.*": {"weight_granularity": "per_tensor"}}, {"quantize", "weight_granularity"}, "t")
    assert m.resolve("conv1") == {"quantize": True}
    assert m.resolve("conv2") == {"quantize": False}  # first matching pattern wins
    assert m.resolve("fc") == {"weight_granularity": "per_tensor"}
    assert OverrideMap.build({}, set(), "t").resolve("x") == {}


@pytest.mark.parametrize("pre", [{"name": "reconstruct_weights", "bits": 4},
                                 {"name": "reparameterize", "bits": 6}])
def test_hinting_passes_must_match_insert_qdq_bit_widths(pre):
    with pytest.raises(ConfigError, match="make them equal"):
        Recipe.from_dict({"name": "x", "passes": [pre, "insert_qdq"]})
    ok = dict(pre, bits=8)
    Recipe.from_dict({"name": "x", "passes": [ok, "insert_qdq"]})
