import pytest

from trainers.config import ConfigError, RunConfig, from_dict, merge, run_config, to_dict


def test_defaults_validate_and_round_trip():
    cfg = run_config()
    assert isinstance(cfg, RunConfig)
    assert run_config(to_dict(cfg)) == cfg


@pytest.mark.parametrize("bad,field", [
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"name": "lion"}}, "optim.name"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"optim": {"momentum": 1.0}}, "optim.momentum"),
    ({"data": {"name": "imagenet"}}, "data.name"),
    ({"data": {"name": "npz"}}, "data.path"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"image_size": 30}}, "data.image_size"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"variant": {"name": "nope"}}, "variant.name"),
    ({"sharpness": {"block_size": 1}}, "sharpness.block_size"),
    ({"sharpness": {"topk": 5}}, "sharpness.topk"),
    ({"sharpness": {"hvp": "finite_differences"}}, "sharpness.hvp"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"bogus": {}}, "bogus"),
    ({"data": {"batch_size": 10}, "optim": {"accumulate": 3}}, "optim.accumulate"),
])
def test_bad_values_are_rejected_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        run_config(bad)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_yaml_style_strings_become_numbers():
    assert run_config({"optim": {"lr": "1e-3"}}).optim.lr == 1e-3


def test_booleans_are_not_numbers():
    with pytest.raises(ConfigError, match="train.steps"):
        run_config({"train": {"steps": True}})


def test_merge_is_recursive_and_override_wins():
    base = {"optim": {"lr": 1.0, "name": "gd"}, "train": {"steps": 3}}
    assert merge(base, {"optim": {"lr": 2.0}}) == {"optim": {"lr": 2.0, "name": "gd"}, "train": {"steps": 3}}
    assert base["optim"]["lr"] == 1.0  # not mutated


def test_from_dict_on_a_section():
    from trainers.config import OptimConfig
    assert from_dict(OptimConfig, {"name": "momentum", "momentum": 0.5}).momentum == 0.5


def test_synthetic_subset_larger_than_the_data_is_rejected_before_launch():
    with pytest.raises(ConfigError, match="^data.subset:"):
        run_config({"data": {"name": "synthetic", "synthetic_size": 100, "subset": 5000}})
