import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from sarloc.backends.encoders import OrtEncoder  # noqa: E402
from sarloc.backends.layout import read_model_manifest  # noqa: E402
from sarloc.calib.dataset import (  # noqa: E402
    build_calibration_set,
    calibration_feed,
    calibration_problems,
    ensure_calibration_set,
    read_calibration_manifest,
)
from sarloc.calib.quantize import _session, calibrate_export, check_feed, model_input_specs, quantize_int8  # noqa: E402
from sarloc.cli import main  # noqa: E402
from sarloc.core.artifacts import sha256_file  # noqa: E402
from sarloc.core.errors import ArtifactError, SarlocError  # noqa: E402
from sarloc.core.preprocess import PreprocessConfig  # noqa: E402
from sarloc.export.onnx import sample_windows  # noqa: E402


@pytest.fixture
def prep(tiny_export):
    return PreprocessConfig(**read_model_manifest(tiny_export / "sar_encoder.onnx")["preprocess"])


def _scene_copies(synth_scenes, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(synth_scenes, root)
    return root


def test_calibration_set_is_stratified_and_versioned(synth_scenes, tmp_path):
    prep = PreprocessConfig()
    out = build_calibration_set([synth_scenes], tmp_path / "c", n_per_scene=6, window_px=64, prep=prep, seed=3)
    man = read_calibration_manifest(out)
    sar = np.load(out / "sar.npy", mmap_mode="r")
    opt = np.load(out / "optical.npy", mmap_mode="r")
    idx = np.load(out / "scene_index.npy")
    assert sar.shape == opt.shape == (12, prep.channels, 64, 64) and sar.dtype == np.float32
    assert np.bincount(idx).tolist() == [6, 6] and man["n"] == 12 and man["n_per_scene"] == 6
    assert [s["count"] for s in man["scenes"]] == [6, 6]
    for s, d in zip(man["scenes"], sorted(synth_scenes.iterdir()), strict=True):
        assert s["path"] == str(d.resolve())
        assert s["optical_sha256"] == sha256_file(d / "optical.png") and s["sar_sha256"] == sha256_file(d / "sar.tif")
    assert all(man["files"][f] == sha256_file(out / f) for f in ("sar.npy", "optical.npy", "scene_index.npy"))
    assert man["preprocess"] == prep.to_dict() and man["window_px"] == 64 and man["shape"] == [prep.channels, 64, 64]
    assert man["schema"] == 1 and man["kind"] == "sarloc.calibration-set" and man["parent_sha256"]
    assert not np.allclose(sar[:6], sar[6:])  # the two scenes contribute different windows
    assert calibration_problems(out, 64, prep) == []
    # deterministic: same seed -> same set hash; another seed -> another set
    again = build_calibration_set([synth_scenes], tmp_path / "c2", n_per_scene=6, window_px=64, prep=prep, seed=3)
    other = build_calibration_set([synth_scenes], tmp_path / "c3", n_per_scene=6, window_px=64, prep=prep, seed=4)
    assert read_calibration_manifest(again)["sha256"] == man["sha256"] != read_calibration_manifest(other)["sha256"]


def test_feed_follows_polygraphy_contract_and_errors_name_the_input(synth_scenes, tmp_path, tiny_export):
    prep = PreprocessConfig(**read_model_manifest(tiny_export / "sar_encoder.onnx")["preprocess"])
    out = build_calibration_set([synth_scenes], tmp_path / "c", n_per_scene=5, window_px=64, prep=prep)
    feeds = list(calibration_feed(out, "optical", "windows", batch_size=4))
    assert [len(f["windows"]) for f in feeds] == [4, 4, 2]
    assert all(set(f) == {"windows"} and f["windows"].dtype == np.float32 for f in feeds)
    specs = model_input_specs(_session(tiny_export / "optical_encoder.onnx"))
    assert specs["windows"][0] == [None, prep.channels, 64, 64]
    check_feed(feeds[0], specs)
    x = feeds[0]["windows"]
    with pytest.raises(SarlocError, match=r"input 'windows' has dtype float64"):
        check_feed({"windows": x.astype(np.float64)}, specs)
    with pytest.raises(SarlocError, match=r"input 'windows' has shape \(4, 1, 64, 64\)"):
        check_feed({"windows": x[:, :1]}, specs)
    with pytest.raises(SarlocError, match=r"input 'windows' has shape \(64, 64\)"):
        check_feed({"windows": x[0, 0]}, specs)
    with pytest.raises(SarlocError, match="input 'windows' is missing"):
        check_feed({}, specs)
    with pytest.raises(SarlocError, match="unexpected input 'images'"):
        check_feed({"windows": x, "images": x}, specs)
    with pytest.raises(SarlocError, match="must be a numpy array"):
        check_feed({"windows": x.tolist()}, specs)


def test_stale_sets_are_detected(synth_scenes, tmp_path):
    prep = PreprocessConfig()
    scenes = _scene_copies(synth_scenes, tmp_path)
    out = build_calibration_set([scenes], tmp_path / "c", n_per_scene=3, window_px=64, prep=prep)
    assert calibration_problems(out, 64, prep) == []
    assert any("take" in p for p in calibration_problems(out, 32, prep))  # window mismatch
    other = PreprocessConfig(n_orient=prep.n_orient - 1)
    probs = calibration_problems(out, 64, other)
    assert any("preprocessing" in p for p in probs) and any("the model takes" in p for p in probs)
    assert any("expected" in p for p in calibration_problems(out, 64, prep, expect_sha256="f" * 64))
    # a source scene replaced after the set was built
    shutil.copy(scenes / "s2" / "optical.png", scenes / "s1" / "optical.png")
    assert any("scene 'synth_seed1' changed" in p for p in calibration_problems(out, 64, prep))
    assert calibration_problems(out, 64, prep, check_scenes=False) == []
    # a truncated array
    p = out / "sar.npy"
    p.write_bytes(p.read_bytes()[:-100])
    assert any("sar.npy does not match its sha256" in p for p in calibration_problems(out, 64, prep))
    # values quoted from the manifest stay on one line (exploring fuzz run: a "format" of "\r")
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**man, "format": "\r", "preprocess": "a\nb"}))
    probs = calibration_problems(out, 64, prep)
    assert any("format '\\r' != " in p for p in probs) and all(len(p.splitlines()) == 1 for p in probs), probs
    (out / "manifest.json").unlink()
    assert "not found" in calibration_problems(out, 64, prep)[0]


def test_ensure_reuses_a_fresh_set_and_rebuilds_a_stale_one(synth_scenes, tmp_path, caplog):
    prep = PreprocessConfig()
    out = ensure_calibration_set([synth_scenes], tmp_path / "c", 3, 64, prep)
    stamp = (out / "sar.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="sarloc"):
        ensure_calibration_set([synth_scenes], out, 3, 64, prep)
    assert "reusing calibration set" in caplog.text and (out / "sar.npy").stat().st_mtime_ns == stamp
    caplog.clear()
    ensure_calibration_set([synth_scenes], out, 4, 64, prep)
    assert "is stale" in caplog.text and "n_per_scene=3" in caplog.text
    assert read_calibration_manifest(out)["n_per_scene"] == 4


def test_int8_model_runs_in_ort_and_stays_close_to_fp32(export_copy, synth_scenes, prep):
    out = calibrate_export(export_copy, [synth_scenes], n_per_scene=16)
    calib = read_calibration_manifest(out["calibration"])
    for m in ("sar", "optical"):
        fp32_path, int8_path = export_copy / f"{m}_encoder.onnx", export_copy / f"{m}_encoder.int8.onnx"
        assert out[m] == int8_path
        man = read_model_manifest(int8_path)
        fp32_man = read_model_manifest(fp32_path)
        assert man["precision"] == "int8" and man["parent_sha256"] == fp32_man["sha256"]
        assert man["calibration"]["sha256"] == calib["sha256"] and man["quantization"]["format"] == "QDQ"
        assert set(man["quantization"]["op_types"]) == {"Conv", "Gemm", "MatMul", "Add"}
        assert man["checkpoint_sha256"] == fp32_man["checkpoint_sha256"]
        assert man["input"] == fp32_man["input"] and man["preprocess"] == fp32_man["preprocess"]
        proto = onnx.load(str(int8_path))
        onnx.checker.check_model(proto)
        ops = [n.op_type for n in proto.graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric, as TensorRT requires
        per_channel = [
            n
            for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[1], np.ones(1)).size > 1
        ]
        assert per_channel  # per-channel weight scales
        # fresh windows (not from the calibration set), through the runtime backend
        x = sample_windows(None, 64, prep, n=24, seed=11)[0][m]
        a = OrtEncoder(fp32_path, threads=1)(x)
        b = OrtEncoder(int8_path, threads=1)(x)
        cos = np.sum(a * b, axis=1)
        assert cos.min() > 0.9 and cos.mean() > 0.97, (cos.min(), cos.mean())
        # the INT8 error is small against the spread between different windows
        spread = np.linalg.norm(a[:, None] - a[None], axis=-1)[np.triu_indices(len(a), 1)].mean()
        assert np.linalg.norm(a - b, axis=1).mean() < 0.5 * spread
        assert man["int8_vs_fp32"]["min_cosine"] > 0.9


def test_stale_calibration_set_warns_and_recalibrates(export_copy, synth_scenes, tmp_path, caplog, prep):
    scenes = _scene_copies(synth_scenes, tmp_path)
    wrong = PreprocessConfig(n_orient=prep.n_orient - 1)  # the model wants another preprocessing (and shape)
    calib = build_calibration_set([scenes], tmp_path / "c", n_per_scene=4, window_px=64, prep=wrong)
    out = quantize_int8(export_copy / "sar_encoder.onnx", calib)
    assert "stale or does not fit" in caplog.text and "preprocessing" in caplog.text
    fixed = read_calibration_manifest(calib)
    assert fixed["preprocess"] == prep.to_dict() and fixed["n_per_scene"] == 4
    assert read_model_manifest(out)["calibration"]["sha256"] == fixed["sha256"]
    # a tampered set is rebuilt too
    caplog.clear()
    p = calib / "optical.npy"
    p.write_bytes(p.read_bytes()[:-64])
    quantize_int8(export_copy / "optical_encoder.onnx", calib)
    assert "optical.npy does not match" in caplog.text
    assert calibration_problems(calib, 64, prep) == []
    # stale and no scene left to rebuild from: a clear error
    p.write_bytes(p.read_bytes()[:-64])
    shutil.rmtree(scenes)
    with pytest.raises(ArtifactError, match="cannot be rebuilt: pass the scenes"):
        quantize_int8(export_copy / "optical_encoder.onnx", calib)


def test_custom_feed_is_checked(export_copy, synth_scenes, tmp_path, prep):
    calib = build_calibration_set([synth_scenes], tmp_path / "c", n_per_scene=4, window_px=64, prep=prep)
    bad = ({"windows": np.zeros((2, prep.channels, 64, 64), np.float64)} for _ in range(2))
    with pytest.raises(SarlocError, match="input 'windows' has dtype float64"):
        quantize_int8(export_copy / "sar_encoder.onnx", calib, feeds=bad)
    assert not (export_copy / "sar_encoder.int8.onnx").exists()
    q = quantize_int8(export_copy / "sar_encoder.onnx", calib, tmp_path / "q.onnx")
    with pytest.raises(ArtifactError, match="quantise the FP32 model"):
        quantize_int8(q, calib)


def test_cli_calib_and_guard(export_copy, synth_scenes, synth_scene, capsys, monkeypatch):
    args = ["calib", "--scenes", str(synth_scenes), "--export", str(export_copy), "--n-per-scene", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sar_encoder.int8.onnx" in printed and (export_copy / "calib" / "manifest.json").is_file()
    from sarloc.eval import export as evaluate

    def fake_guard(export_dir, scene_dir, eval_cfg, max_drop=0.01, threads=0):
        return {"scene": "s", "fp32": {"arbitrary": 0.5}, "int8": {"arbitrary": 0.4}, "drop": 0.1,
                "max_drop": max_drop, "passed": False}  # fmt: skip

    monkeypatch.setattr(evaluate, "int8_accuracy_guard", fake_guard)
    assert main([*args, "--guard-scene", str(synth_scene)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("sarloc calib: error: INT8 loses 10.0 points of recall@1")
    assert err.count("error:") == 1 and "Traceback" not in err
    assert json.loads((export_copy / "int8_guard.json").read_text())["passed"] is False
    assert main(["calib", "--scenes", str(synth_scenes), "--export", str(export_copy / "nope")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_calib_leaves_the_guard_scene_out_of_the_calibration(export_copy, synth_scene, capsys):
    """The guard judges INT8 on a scene the calibration did not see: a guard that is the only scene is refused."""
    args = ["calib", "--scenes", str(synth_scene), "--export", str(export_copy), "--guard-scene", str(synth_scene)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds only the --guard-scene" in err
    assert not (export_copy / "calib").exists()
