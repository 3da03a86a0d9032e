"""The one-line rule of user-facing errors holds whatever a message quotes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sarloc.core.errors import ArtifactError, ConfigError, SarlocError, SceneError, one_line


@pytest.mark.parametrize("cls", [SarlocError, SceneError, ConfigError, ArtifactError])
@pytest.mark.parametrize("brk", ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_every_line_break_is_escaped(cls, brk):
    e = cls(f"manifest says line{brk}break; re-export it")
    msg = str(e)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith("manifest says line") and msg.endswith("break; re-export it")
    assert msg == one_line(e.args[0]) and e.args[0].count(brk) == 1  # the original text is kept in args


def test_plain_message_is_unchanged():
    text = "scene.json: malformed JSON (Expecting value: line 1 column 1); fix or regenerate it\t(tab kept)"
    assert str(SceneError(text)) == text


def test_manifest_value_with_line_break_gives_one_line_error(tmp_path):
    """Regression (CI, fuzz seed): a manifest sha256 "line\\nbreak.png" made a two-line ArtifactError."""
    from sarloc.backends.layout import manifest_path, read_model_manifest

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not the exported model")
    man = {"kind": "sarloc.onnx-encoder", "sha256": "line\nbreak.png", "input": {}, "output": {}}
    man |= {"preprocess": {}, "window_px": 8, "embed_dim": 64, "modality": "sar", "precision": "fp32"}
    manifest_path(onnx).write_text(json.dumps(man))
    with pytest.raises(ArtifactError) as ei:
        read_model_manifest(onnx)
    assert len(str(ei.value).splitlines()) == 1 and "manifest says 'line\\nbreak.p'" in str(ei.value)


def test_cli_prints_one_line(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text("{")
    cmd = [sys.executable, "-m", "sarloc", "train", "--config", str(bad), "--scenes", str(tmp_path), "--out",
           str(tmp_path / "o")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("sarloc train: error: --config ") and "not valid JSON" in r.stderr, r.stderr
