"""Training configs from untrusted JSON (``--config``, checkpoints): keys, types and ranges give one-line errors."""

from __future__ import annotations

import json

import pytest

from sarloc.cli import main
from sarloc.cli.common import read_config
from sarloc.core.errors import ConfigError
from sarloc.trainer.config import TrainConfig, resolve_config


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"steps": "300"}, r"steps = '300' has the wrong type \(expected int\)"),
        ({"steps": 300.0}, r"steps = 300.0 has the wrong type"),
        ({"lr": True}, r"lr = True has the wrong type \(expected float\)"),
        ({"lr": float("nan")}, r"lr = nan has the wrong type"),
        ({"lr": 10**400}, r"lr = 1000.* has the wrong type"),  # beyond the float range: was an OverflowError
        ({"lr": 0.0}, r"lr.* out of range"),
        ({"temperature": -0.1}, r"temperature.* out of range"),
        ({"log_every": 0}, r"log_every out of range"),
        ({"max_minutes": -1}, r"max_minutes out of range"),
        ({"encoder": 5}, r"\[encoder\]: expected a table of settings, got int"),
        ({"encoder": {"pretrained": "no"}}, r"\[encoder\]: pretrained = 'no' has the wrong type \(expected bool\)"),
        ({"encoder": {"depth": 3}}, r"\[encoder\]: unknown key\(s\) depth"),
        ({"augment": {"speckle_looks": [2.0]}}, r"\[augment\]: speckle_looks = \(2.0,\) has the wrong type"),
        ({"augment": {"speckle_looks": ["a", 1]}}, r"speckle_looks .* wrong type"),
        ({"preprocess": {"n_orient": 2.5}}, r"\[preprocess\]: n_orient = 2.5 has the wrong type"),
    ],
)
def test_malformed_values_are_refused_naming_the_key(override, match):
    base = resolve_config("smoke").to_dict()
    for k, v in override.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    with pytest.raises(ConfigError, match=match) as ei:
        TrainConfig.from_dict(base)
    assert "\n" not in str(ei.value)


def test_json_round_trip_keeps_tuples_and_ints_as_floats():
    cfg = resolve_config("smoke", lr=1, augment={"speckle_looks": [3, 5]})  # JSON ints where floats are declared
    assert cfg.lr == 1 and cfg.augment.speckle_looks == (3, 5)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="expected a JSON object"):
        TrainConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.json", "{", r"not valid JSON \(Expecting"),
        ("c.json", "[1, 2]", r"expected a table of settings, got list"),
        ("c.json", "[" * 5000 + "]" * 5000, r"not valid JSON"),
        ("c.json", b"\xff\xfe{}", r"cannot read it"),
        ("c.toml", "steps = ", r"not valid TOML"),
        ("c.toml", "[a\nb = 1", r"not valid TOML"),
    ],
)
def test_config_file_that_is_no_table_of_settings(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=match):
        read_config(p)
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "nope.json")


def test_config_file_toml_and_json_give_the_same_settings(tmp_path):
    (tmp_path / "c.toml").write_text("steps = 5\n[encoder]\npretrained = false\n")
    (tmp_path / "c.json").write_text(json.dumps({"steps": 5, "encoder": {"pretrained": False}}))
    assert (
        read_config(tmp_path / "c.toml")
        == read_config(tmp_path / "c.json")
        == {
            "steps": 5,
            "encoder": {"pretrained": False},
        }
    )


def test_cli_train_with_malformed_config_exits_1_before_training(tmp_path, capsys, synth_scene):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": "many"}))
    out = tmp_path / "run"
    assert (
        main(["train", "--scenes", str(synth_scene), "--out", str(out), "--preset", "smoke", "--config", str(p)]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steps = 'many' has the wrong type" in err
    assert not (out / "checkpoint.pt").exists()
