"""Recipes: shipped presets validate, flags override, mistakes are named."""
from __future__ import annotations

import pytest

from tlpipe.config import available_recipes, config_to_yaml, load_config
from tlpipe.errors import TlpipeError


@pytest.mark.parametrize("name", ["default", "quick", "best", "far"])
def test_shipped_recipes_validate(name):
    assert name in available_recipes()
    config = load_config(name)
    assert config.strategy == "auto"


def test_flags_override_recipe_values_and_none_keeps_them():
    config = load_config("quick", batch_size=7, seed=None, linear={"cv_folds": 4})
    assert config.batch_size == 7
    assert config.image_size == 160  # from quick.yaml
    assert config.linear.cv_folds == 4 and config.linear.classifiers == ["logreg"]


def test_recipe_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("backbone: efficientnet_lite1\nseed: 3\n")
    config = load_config(path)
    assert (config.backbone, config.seed, config.batch_size) == ("efficientnet_lite1", 3, 64)


@pytest.mark.parametrize("text, message", [
    ("batchsize: 8\n", "unknown key 'batchsize'.*did you mean 'batch_size'"),
    ("linear:\n  cv_fold: 3\n", "unknown key 'linear.cv_fold'.*cv_folds"),
    ("batch_size: eight\n", "'batch_size'.*got 'eight'"),
    ("val_fraction: 1.5\n", "'val_fraction'"),
    ("strategy: magic\n", "'strategy'"),
    ("- just\n- a list\n", "must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_recipe_mistakes_are_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TlpipeError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value) and "bad.yaml" in str(err.value)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(TlpipeError, match="best, default, far, quick"):
        load_config("fastest")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config("default", seed=5)
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


def test_each_identity_of_a_fit_leaves_out_only_its_own_fields():
    from tlpipe.config import fit_identity, load_config

    config = load_config("default")
    differs = {"budget": {"budget": "10m"}, "device": {"device": "cpu"}, "cache_dir": {"cache_dir": "/elsewhere"},
               "trials": {"tuning": {"trials": 3}}, "lr_range": {"tuning": {"lr_range": [1e-4, 1e-3]}}}
    same = {scope: {name for name, change in differs.items()
                    if fit_identity(load_config("default", **change), scope) == fit_identity(config, scope)}
            for scope in ("fit", "study", "plan", "checkpoint")}
    assert same == {"fit": {"budget", "device"}, "study": {"budget", "device", "cache_dir", "trials"},
                    "plan": {"budget"}, "checkpoint": {"budget", "device", "cache_dir"}}
    assert fit_identity(config, "fit", data="a") != fit_identity(config, "fit", data="b")
