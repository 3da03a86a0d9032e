import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from sarloc.backends.encoders import OrtEncoder, load_encoder, load_encoder_pair
from sarloc.backends.tensorrt import ENGINE_KIND
from sarloc.cli import main
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError
from sarloc.eval.export import evaluate_onnx, int8_accuracy_guard
from sarloc.eval.retrieval import EvalConfig
from sarloc.export.onnx import sample_windows


@pytest.fixture(scope="module")
def windows(tiny_export):
    enc = OrtEncoder(tiny_export / "sar_encoder.onnx", threads=1)
    return sample_windows(None, enc.window_px, enc.preprocess, n=6, seed=4)[0]


def test_runtime_imports_and_runs_without_torch(tiny_export):
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import importlib, pkgutil
        import sarloc
        import sarloc.backends.encoders as b
        names = []
        # every module but the trainer (PyTorch) and the entry points
        for m in pkgutil.walk_packages(sarloc.__path__, "sarloc."):
            if not m.name.startswith(("sarloc.trainer", "sarloc._")) and not m.name.endswith("__main__"):
                importlib.import_module(m.name)
                names.append(m.name)
        assert {"sarloc.runtime.daemon", "sarloc.core.cfog", "sarloc.sim.closed_loop", "sarloc.cli"} <= set(names)
        sar, opt = b.load_encoder_pair(sys.argv[1], threads=1)
        c, h, w = sar.input_chw
        z = sar(np.zeros((2, c, h, w), np.float32))
        assert z.shape == (2, sar.embed_dim), z.shape
        assert sys.modules["torch"] is None
        print("ok", z.shape)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tiny_export)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_ort_encoder_checks_input_at_the_boundary(tiny_export, windows):
    enc = OrtEncoder(tiny_export / "sar_encoder.onnx", threads=1)
    c, h, w = enc.input_chw
    assert enc.modality == "sar" and enc.precision == "fp32" and enc.input_name == "windows"
    z = enc(windows["sar"])
    assert z.shape == (6, enc.embed_dim) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert enc(np.zeros((0, c, h, w), np.float32)).shape == (0, enc.embed_dim)
    assert np.allclose(enc(np.asfortranarray(windows["sar"])), z, atol=1e-6)  # non-contiguous input is fine
    with pytest.raises(SarlocError, match=r"input 'windows' must be float32, got float64"):
        enc(windows["sar"].astype(np.float64))
    with pytest.raises(SarlocError, match=rf"input 'windows' must be \(B, {c}, {h}, {w}\), got \(6, {c}, 32, 32\)"):
        enc(np.ascontiguousarray(windows["sar"][:, :, :32, :32]))
    with pytest.raises(SarlocError, match=r"input 'windows' must be \(B, .*got \(64, 64\)"):
        enc(windows["sar"][0, 0])
    with pytest.raises(SarlocError, match="input 'windows' must be a numpy array, got list"):
        enc(windows["sar"].tolist())


def test_modified_truncated_or_corrupt_onnx_is_refused(export_copy, capsys, synth_scene):
    p = export_copy / "sar_encoder.onnx"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ArtifactError) as e:
        OrtEncoder(p)
    assert "\n" not in str(e.value) and "sha256" in str(e.value) and "re-export" in str(e.value)
    # even without the hash check, a truncated model fails with one clear line, not an ORT traceback
    with pytest.raises(ArtifactError, match=r"could not be loaded by ONNX Runtime .*corrupt or truncated"):
        OrtEncoder(p, verify_sha256=False)
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        OrtEncoder(p, verify_sha256=False)
    p.write_bytes(good)
    OrtEncoder(p)
    (export_copy / "sar_encoder.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        OrtEncoder(p)
    (export_copy / "sar_encoder.json").unlink()
    with pytest.raises(ArtifactError, match=r"ONNX model manifest: .*sar_encoder\.json not found"):
        OrtEncoder(p)
    rc = main(["eval", "--scene", str(synth_scene), "--export", str(export_copy), "--queries", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "sar_encoder.json not found" in err[0]


def test_pair_loading_checks_consistency_and_precision(export_copy):
    sar, opt = load_encoder_pair(export_copy, threads=1)
    assert (sar.modality, opt.modality) == ("sar", "optical")
    with pytest.raises(ArtifactError, match=r"INT8 model .* not found; build it with `sarloc calib"):
        load_encoder_pair(export_copy, "int8")
    with pytest.raises(ConfigError, match="fp16 exists only as a TensorRT engine"):
        load_encoder_pair(export_copy, "fp16")
    with pytest.raises(ConfigError, match="backend"):
        load_encoder_pair(export_copy, backend="tensorflow")
    man_path = export_copy / "optical_encoder.json"
    man = json.loads(man_path.read_text())
    man["checkpoint_sha256"] = "0" * 64
    man_path.write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="differ in checkpoint_sha256"):
        load_encoder_pair(export_copy)


def test_auto_backend_falls_back_to_onnx_runtime(export_copy, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    enc = load_encoder(export_copy, "sar", backend="auto", threads=1)
    assert isinstance(enc, OrtEncoder) and "falling back to ONNX Runtime" in caplog.text
    assert "sar_encoder.engine not found" in caplog.text
    with pytest.raises(ArtifactError, match="sarloc build-engine"):
        load_encoder(export_copy, "sar", backend="trt")
    # an engine is present but TensorRT is not: the same fallback, naming the install
    engine = export_copy / "sar_encoder.engine"
    engine.write_bytes(b"PLAN")
    from sarloc.core.artifacts import sha256_file

    onnx_man = json.loads((export_copy / "sar_encoder.json").read_text())
    man = {k: onnx_man[k] for k in ("modality", "input", "output", "embed_dim", "window_px", "preprocess")}
    man |= {"kind": ENGINE_KIND, "file": engine.name, "sha256": sha256_file(engine), "precision": "fp32"}
    man |= {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    man |= {"onnx": {"file": "sar_encoder.onnx"}, "profiles": [{"max": [32, *onnx_man["input"]["shape"][1:]]}]}
    (export_copy / "sar_encoder.engine.json").write_text(json.dumps(man))
    caplog.clear()
    assert isinstance(load_encoder(export_copy, "sar", backend="auto", threads=1), OrtEncoder)
    assert "sarloc[gpu]" in caplog.text
    with pytest.raises(SarlocError, match="TensorRT is not available"):
        load_encoder(export_copy, "sar", backend="trt")
    caplog.clear()
    assert isinstance(load_encoder(export_copy, "sar", "fp16", backend="auto", threads=1), OrtEncoder)
    assert "sar_encoder.fp16.engine not found" in caplog.text


def test_eval_through_onnx_matches_pytorch(tiny_export, synth_scene, tmp_path):
    torch = pytest.importorskip("torch")
    from sarloc.trainer.loop import evaluate_checkpoint

    cfg = EvalConfig(window_px=64, queries=8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = evaluate_checkpoint(tiny_export.parent / "run" / "checkpoint.pt", synth_scene, cfg)
    finally:
        torch.set_num_threads(n)
    got = evaluate_onnx(tiny_export, synth_scene, cfg, threads=1)
    assert got["precision"] == "fp32" and got["backend"] == "OrtEncoder"
    for kind in ("aligned", "arbitrary", "arbitrary_overlap50"):
        for k in ("recall@1", "recall@5", "median_error_m", "queries"):
            assert got[kind][k] == ref[kind][k], (kind, k)
    with pytest.raises(SarlocError, match="take 64 px windows, not 32"):
        evaluate_onnx(tiny_export, synth_scene, EvalConfig(window_px=32, queries=4), threads=1)


def test_cli_eval_onnx_and_int8_guard(export_copy, synth_scene, synth_scenes, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--scene", str(synth_scene), "--export", str(export_copy), "--queries", "5", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["precision"] == "fp32" and res["arbitrary"]["queries"] == 5
    assert "onnx-fp32" in capsys.readouterr().out
    assert main([*argv, "--precision", "int8"]) == 1
    assert "sarloc calib" in capsys.readouterr().err
    assert main(["calib", "--scenes", str(synth_scenes), "--export", str(export_copy), "--n-per-scene", "4"]) == 0
    assert main([*argv, "--precision", "int8"]) == 0
    assert json.loads(out.read_text())["arbitrary"]["method"] == "onnx-int8"

    guard = int8_accuracy_guard(export_copy, synth_scene, EvalConfig(window_px=64, queries=6), threads=1)
    assert set(guard["fp32"]) == {"aligned", "arbitrary"} and isinstance(guard["passed"], bool)
    assert guard["drop"] == max(guard["fp32"][k] - guard["int8"][k] for k in guard["fp32"])
    strict = int8_accuracy_guard(export_copy, synth_scene, EvalConfig(window_px=64, queries=6), max_drop=-1.0)
    assert strict["passed"] is False
    # an INT8 model left over from an earlier export is refused once the FP32 model is re-exported
    onnx = pytest.importorskip("onnx")
    from sarloc.core.artifacts import sha256_file

    fp32 = export_copy / "sar_encoder.onnx"
    proto = onnx.load(str(fp32))
    proto.doc_string = "re-exported"
    onnx.save(proto, str(fp32))
    man = json.loads((export_copy / "sar_encoder.json").read_text())
    man["sha256"] = sha256_file(fp32)
    (export_copy / "sar_encoder.json").write_text(json.dumps(man))
    load_encoder(export_copy, "sar", "fp32")
    with pytest.raises(ArtifactError, match=r"sar_encoder\.int8\.onnx was built from another version"):
        load_encoder(export_copy, "sar", "int8")


@pytest.mark.gpu
def test_trt_encoder_on_gpu(tiny_export, tmp_path, windows):
    """Needs TensorRT, a CUDA binding and a GPU: not run on this project's machines (see docs/export.md)."""
    pytest.importorskip("tensorrt")
    from sarloc.backends.encoders import TrtEncoder
    from sarloc.backends.tensorrt import current_gpu
    from sarloc.export.engine import build_engine

    try:
        current_gpu(0)
    except SarlocError as e:
        pytest.skip(str(e))
    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    build_engine(d / "sar_encoder.onnx")
    enc = load_encoder(d, "sar", backend="trt")
    assert isinstance(enc, TrtEncoder)
    with enc:
        assert np.abs(enc(windows["sar"]) - OrtEncoder(d / "sar_encoder.onnx")(windows["sar"])).max() < 1e-3
