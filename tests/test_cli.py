import json
import subprocess
import sys

import pytest

from sarloc.cli import main


def test_synth_then_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "scene"
    assert main(["synth", "--out", str(out), "--width-px", "128", "--height-px", "128"]) == 0
    assert (out / "scene.json").is_file()
    assert main(["synth", "--out", str(out), "--width-px", "128", "--height-px", "128"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--scene", str(tmp_path / "missing"), "--checkpoint", "x.pt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scene.json").write_text("{oops")
    assert main(["eval", "--scene", str(bad), "--method", "cfog"]) == 1
    assert "malformed JSON" in capsys.readouterr().err


def test_eval_needs_checkpoint(synth_scene, capsys):
    assert main(["eval", "--scene", str(synth_scene)]) == 1
    assert "--checkpoint" in capsys.readouterr().err


def test_eval_cfog_writes_json(synth_scene, tmp_path):
    out = tmp_path / "cfog.json"
    assert main(["eval", "--scene", str(synth_scene), "--method", "cfog", "--queries", "5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["arbitrary"]["queries"] == 5 and 0 <= res["arbitrary"]["recall@1"] <= 1


def test_train_bad_preset_and_window(synth_scene, tmp_path, capsys):
    assert main(["train", "--scenes", str(synth_scene), "--out", str(tmp_path / "r"), "--preset", "nope"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    rc = main(
        ["train", "--scenes", str(synth_scene), "--out", str(tmp_path / "r"), "--preset", "smoke", "--window-px", "512"]
    )
    assert rc == 1
    assert "512 px" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sarloc.cli", "eval", "--scene", str(tmp_path), "--method", "cfog"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "scene.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["--version"], ["train", "--help"], ["eval", "--help"], ["synth", "--help"]])
def test_help(cmd):
    with pytest.raises(SystemExit) as e:
        main(cmd)
    assert e.value.code == 0
