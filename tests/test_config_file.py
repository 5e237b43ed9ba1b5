"""The editor's config file: its keys are EditConfig's fields; unknown keys and bad values are refused by name."""

import dataclasses

import pytest

from vitedit.config_file import config_keys, read_edit_config
from vitedit.edit import EditConfig, objective_config
from vitedit.errors import UsageError


def test_the_keys_are_the_edit_config_fields_but_the_preset():
    assert set(config_keys()) == {f.name for f in dataclasses.fields(EditConfig)} - {"objective"}


def test_values_merge_over_the_preset(tmp_path):
    path = tmp_path / "edit.toml"
    path.write_text('lr = 1e-4\nmax_steps = 7\nnullspace_threshold = "off"\nstop_margin = 0.2\npreserve_weight = 1\n')
    overrides = read_edit_config(path)
    assert overrides == {"lr": 1e-4, "max_steps": 7, "nullspace_threshold": "off", "stop_margin": 0.2,
                         "preserve_weight": 1.0}
    cfg = objective_config("local", **overrides)
    assert (cfg.lr, cfg.max_steps, cfg.nullspace_threshold, cfg.stop_margin, cfg.preserve_weight) == (1e-4, 7, None, 0.2, 1.0)


@pytest.mark.parametrize("text, key", [("learning_rate = 1e-4", "learning_rate"), ('max_steps = "many"', "max_steps"),
                                       ("max_steps = 1.5", "max_steps"), ("objective = 'plain'", "objective"),
                                       ("stop_margin = true", "stop_margin"), ("preserve_loss = 3", "preserve_loss")])
def test_unknown_keys_and_bad_values_are_refused_by_name(tmp_path, text, key):
    path = tmp_path / "edit.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError, match=key) as e:
        read_edit_config(path)
    assert "\n" not in str(e.value)


def test_a_missing_or_broken_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_edit_config(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("lr = = 1\n")
    with pytest.raises(UsageError, match="TOML"):
        read_edit_config(tmp_path / "bad.toml")
