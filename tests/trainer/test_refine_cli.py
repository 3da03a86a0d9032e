"""`sarloc train-refiner` and `sarloc eval --refine` end to end on a generated scene (tiny untrained encoder)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")


def test_train_refiner_then_eval_refine(tiny_export, synth_scene, tmp_path):
    from sarloc.cli import main

    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    src = tiny_export.parent / "run"
    shutil.copy2(src / "checkpoint.pt", ckpt)
    shutil.copy2(src / "checkpoint.json", ckpt.with_suffix(".json"))
    assert (
        main(
            [
                "train-refiner",
                "--checkpoint",
                str(ckpt),
                "--scenes",
                str(synth_scene),
                "--steps",
                "20",
                "--queries",
                "30",
            ]
        )
        == 0
    )
    for name in ("refiner.onnx", "refiner.json", "verifier.json", "shortlister.json"):
        assert (ckpt.parent / name).is_file(), name
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--scene",
                str(synth_scene),
                "--refine",
                "--queries",
                "12",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["refiner_training"] == "post-hoc"
    for key in (
        "arbitrary/none",
        "arbitrary/qe",
        "arbitrary/kreciprocal",
        "arbitrary/spatial",
        "arbitrary/gnn",
        "arbitrary/gnn+metric",
        "aligned/none+metric",
    ):
        assert "recall@1" in res[key], key
    full = [k for k in res if k.startswith("arbitrary/full")]
    assert full and "reliability" in res[full[0]] and "median_error_m" in res[full[0]]
    # a refiner trained for another encoder is refused
    man = json.loads((ckpt.parent / "refiner.json").read_text())
    man["parent_sha256"] = "0" * 64
    (ckpt.parent / "refiner.json").write_text(json.dumps(man))
    assert main(["eval", "--checkpoint", str(ckpt), "--scene", str(synth_scene), "--rerank", "gnn"]) == 1
