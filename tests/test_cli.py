import json
import subprocess
import sys
from pathlib import Path

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


def test_version(capsys):
    from sarloc import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sarloc {__version__}"


@pytest.mark.parametrize(
    ("cmd", "options"),
    [
        (["train"], ["--scenes SCENES", "--out OUT", "--preset PRESET", "--steps STEPS", "--config CONFIG"]),
        (["eval"], ["--scene SCENE", "--checkpoint CHECKPOINT", "--method {encoder,cfog}", "--queries", "--json"]),
        (["synth"], ["--out OUT", "--width-px", "--height-px", "--gsd-m", "--seed", "--force"]),
        (["map", "build"], ["--basemap BASEMAP", "--export DIR", "--out", "--tile-m", "--force"]),
    ],
    ids=["train", "eval", "synth", "map build"],
)
def test_help(cmd, options, capsys):
    """``sarloc CMD --help``: exit 0, a usage line naming the subcommand, and its main options."""
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sarloc {' '.join(cmd)} "), out[:200]
    usage = out.split("\n\n")[0]
    for opt in options:
        assert opt in usage, (opt, usage)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["synth", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["eval", "--scene", "s", "--method", "cfog", "--no-such-option", "1"], "unrecognized arguments"),
        (["synth", "--out", "x", "--width-px", "wide"], "--width-px"),
        (["map", "build", "--basemap", "b", "--export", "e", "--out", "o", "--bogus"], "--bogus"),
    ],
)
def test_bad_option_exits_2_naming_the_subcommand(argv, named, capsys):
    cmd = " ".join(argv[:2] if argv[0] == "map" else argv[:1])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: sarloc {cmd} " in err and f"sarloc {cmd}: error: " in err and named in err, err


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="argparse's help layout differs between Python versions")
def test_command_reference_page_is_current():
    """docs/cli.md is generated from the parser: an option added without regenerating it fails here."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "cli_reference.py"), "--check"], capture_output=True)
    assert r.returncode == 0, "docs/cli.md is out of date: run `python scripts/cli_reference.py`"
