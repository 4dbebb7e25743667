"""Bad configuration and unknown methods fail early with errors that name the value and the fix."""

from __future__ import annotations

import json

import pytest

from fedunlearn.config import build_config, load_config_file
from fedunlearn.errors import ConfigError, UnknownMethodError
from simulations.methods import check_methods, get_method
from simulations.run import main


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"rounds": 0}, "rounds=0: must be >= 1"),
        ({"num_clients": 1}, "num-clients=1"),
        ({"partition": "dirichlet-ish"}, "partition='dirichlet-ish': must be one of iid, dirichlet"),
        ({"lr": -1}, "lr=-1.0: must be > 0"),
        ({"forget_client": 12}, "forget-client=12: must be a partition id in [0, 9]"),
        ({"withdraw_round": 30}, "withdraw-round=30: must be in [1, 29]"),
        ({"fraction_fit": 1.5}, "fraction-fit=1.5"),
        ({"iau_step_rule": "adam"}, "iau-step-rule='adam'"),
        ({"methods": "retrain,retrain"}, "listed twice"),
    ],
)
def test_bad_values_name_the_key_and_the_range(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config("default", overrides=overrides)
    assert message in str(err.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'num-clients'"):
        build_config("default", overrides={"num-client": 3})


def test_unknown_preset_and_bad_types():
    with pytest.raises(ConfigError, match="preset='smok'.*did you mean 'smoke'"):
        build_config("smok")
    with pytest.raises(ConfigError, match="rounds='ten': expected"):
        build_config("default", overrides={"rounds": "ten"})


def test_unknown_method_lists_the_registered_ones():
    # ('iua' is now as close to 'imu' as to 'iau', so the typo checked is one with a single closest name.)
    with pytest.raises(
        UnknownMethodError,
        match="unknown method 'fedearser'.*did you mean 'federaser'.*available: retrain, iau, "
        "iau-cached, finetune, gradient-ascent, federaser, pga, imu$",
    ):
        check_methods(["retrain", "fedearser"])
    assert get_method("iau").name == "iau"


def test_cli_refuses_unknown_method_before_starting_anything(capsys):
    assert main(["--methods", "iau,federased", "--out", "/nonexistent/never-written"]) == 2
    assert "unknown method 'federased'" in capsys.readouterr().err


def test_config_file_keys_match_flags(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text('num-clients = 6\nrounds = 4\nmethods = "retrain,iau"\npartition = "dirichlet"\n')
    assert main(["--config", str(path), "--rounds", "5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num-clients"] == 6 and printed["rounds"] == 5 and printed["methods"] == ["retrain", "iau"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_clientz": 3}))
    with pytest.raises(ConfigError, match="did you mean 'num-clients'"):
        load_config_file(bad)
    assert main(["--config", str(bad)]) == 2
