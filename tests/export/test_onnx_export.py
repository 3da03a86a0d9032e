import json
import shutil

import numpy as np
import pytest
from helpers import shared_scene

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sarloc.backends.encoders import OrtEncoder  # noqa: E402
from sarloc.backends.layout import MODALITIES, model_path, read_model_manifest  # noqa: E402
from sarloc.cli import main  # noqa: E402
from sarloc.core.artifacts import sha256_file  # noqa: E402
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError  # noqa: E402
from sarloc.core.preprocess import PreprocessConfig  # noqa: E402
from sarloc.export import onnx as export_onnx  # noqa: E402
from sarloc.export.onnx import (  # noqa: E402
    check_parity,
    export_checkpoint,
    export_encoder,
    resolve_exporter,
    sample_windows,
)
from sarloc.trainer.checkpoint import checkpoint_embed_fns, load_checkpoint  # noqa: E402
from sarloc.trainer.models.encoder import CrossModalEncoder, EncoderConfig  # noqa: E402

# Every op type the encoder exports to, for every pooling option. A new op (e.g. a scatter when the graph
# refiner lands) fails test_parity_covers_every_op until its parity is covered here.
VERIFIED_OPS = {
    "Add",
    "AveragePool",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Expand",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "Max",
    "Mul",
    "Pow",
    "Reciprocal",
    "ReduceL2",
    "ReduceMean",
    "Reshape",
    "Shape",
    "Slice",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
}
EXPORTERS = ["legacy"] + (["dynamo"] if export_onnx._have_onnxscript() else [])


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_export):
    return tiny_export.parent / "run" / "checkpoint.pt"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_export_writes_verified_models_and_manifests(tiny_export, tiny_checkpoint):
    index = json.loads((tiny_export / "export.json").read_text())
    ck_sha = sha256_file(tiny_checkpoint)
    model, cfg, _ = load_checkpoint(tiny_checkpoint)
    c = cfg.preprocess.channels
    d = int(model.embed(torch.zeros(1, c, 64, 64), "sar").shape[1])
    assert index["parent_sha256"] == ck_sha and set(index["models"]) == set(MODALITIES)
    for m in MODALITIES:
        p = model_path(tiny_export, m)
        man = read_model_manifest(p)  # verifies the file's sha256
        assert man["sha256"] == sha256_file(p) == index["models"][m]["sha256"]
        assert man["parent_sha256"] == ck_sha == man["checkpoint_sha256"]
        assert man["modality"] == m and man["precision"] == "fp32" and man["opset"] == 18
        assert man["input"] == {"name": "windows", "shape": ["batch", c, 64, 64], "dtype": "float32"}
        assert man["output"]["name"] == "embeddings" and man["output"]["shape"] == ["batch", d]
        assert man["embed_dim"] == d and man["window_px"] == 64
        assert man["preprocess"] == cfg.preprocess.to_dict() and man["encoder"] == cfg.encoder.to_dict()
        par = man["parity"]
        assert par["passed"] and par["max_abs_diff"] <= par["tolerance"] == 1e-4
        assert par["source"] == "synth:seed0" and par["batch_sizes"] == [1, 16]
        assert "BatchNormalization" not in man["ops"]  # folded into the convolutions
        proto = onnx.load(str(p))
        onnx.checker.check_model(proto, full_check=True)
        ins, outs = proto.graph.input, proto.graph.output
        assert [x.dim_param or x.dim_value for x in ins[0].type.tensor_type.shape.dim] == ["batch", c, 64, 64]
        assert [x.dim_param or x.dim_value for x in outs[0].type.tensor_type.shape.dim] == ["batch", d]
        meta = {kv.key: kv.value for kv in proto.metadata_props}
        assert meta["sarloc.modality"] == m and meta["sarloc.checkpoint_sha256"] == ck_sha


@pytest.mark.parametrize("modality", MODALITIES)
def test_parity_per_model_across_batch_sizes(tiny_export, tiny_checkpoint, modality):
    model, cfg, _ = load_checkpoint(tiny_checkpoint)
    ref = dict(zip(MODALITIES, checkpoint_embed_fns(model), strict=True))[modality]
    enc = OrtEncoder(model_path(tiny_export, modality), threads=1)
    wins, _ = sample_windows(None, 64, cfg.preprocess, n=33, seed=5)
    for b in (1, 3, 33):
        x = wins[modality][:b]
        got, want = enc(x), ref(x)
        assert got.shape == (b, enc.embed_dim) == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-4
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("pool", ["gem", "avg", "pyramid"])
def test_parity_covers_every_op(tmp_path, exporter, pool):
    """Every op the encoder exports to, under each exporter and pooling, is checked against PyTorch."""
    torch.manual_seed(1)
    prep = PreprocessConfig()
    enc_cfg = EncoderConfig(
        in_channels=prep.channels, pretrained=False, last_block=3, shared_from=1, embed_dim=32, pool=pool
    )
    model = CrossModalEncoder(enc_cfg)
    # non-trivial batch-norm statistics, so that folding them into the convolutions is actually exercised
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    wins, src = sample_windows(None, 64, prep, n=8, seed=2)
    man = export_encoder(
        model,
        "sar",
        tmp_path / "m.onnx",
        window_px=64,
        prep=prep,
        windows=wins["sar"],
        checkpoint_sha256="0" * 64,
        exporter=exporter,
        source=src,
    )
    ops = set(man["ops"])
    assert ops <= VERIFIED_OPS, f"ops not yet covered by parity: {sorted(ops - VERIFIED_OPS)}"
    assert {"Conv", "Clip", "Add", "Gemm"} <= ops and "BatchNormalization" not in ops
    assert "Div" in ops or "LpNormalization" in ops  # L2 normalisation
    if pool != "avg":
        assert "Pow" in ops  # GeM
    assert man["exporter"] == exporter and man["parity"]["max_abs_diff"] <= 1e-4


@pytest.mark.shared_data
def test_parity_on_real_windows(tiny_checkpoint, tmp_path):
    scene = shared_scene("france_s1s2")
    index = export_checkpoint(tiny_checkpoint, tmp_path / "x", scene_dir=scene, exporter="legacy")
    for m in MODALITIES:
        assert index["models"][m]["parity"]["source"] == "scene:france_s1s2"
        assert index["models"][m]["parity"]["max_abs_diff"] <= 1e-4


def test_parity_beyond_tolerance_fails_loudly_and_writes_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    wins, _ = sample_windows(None, 64, PreprocessConfig(), n=4, seed=0)
    x = wins["sar"]
    ident = lambda a: a.reshape(len(a), -1)[:, :8]  # noqa: E731
    assert _parity_with(ident, ident, x)["max_abs_diff"] == 0.0
    with pytest.raises(ArtifactError, match="tolerance"):
        _parity_with(lambda a: ident(a) + 1e-3, ident, x)
    with pytest.raises(ArtifactError, match="not finite"):
        _parity_with(lambda a: ident(a) * np.nan, ident, x)

    real = export_onnx._ort_session

    class Noisy:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            return [o + 1e-2 for o in self.sess.run(names, feed)]

    monkeypatch.setattr(export_onnx, "_ort_session", lambda m, threads=1: Noisy(real(m, threads)))
    with pytest.raises(ArtifactError, match=r"differs from PyTorch by .* > tolerance"):
        export_checkpoint(tiny_checkpoint, tmp_path / "bad", exporter="legacy", parity_windows=4)
    assert not list((tmp_path / "bad").glob("*.onnx")) and not (tmp_path / "bad" / "export.json").exists()


def _parity_with(ort_fn, reference, x):
    """check_parity against a fake session whose output is ``ort_fn(x)``."""

    class Fake:
        def run(self, names, feed):
            return [ort_fn(feed["windows"])]

    orig = export_onnx._ort_session
    export_onnx._ort_session = lambda m, threads=1: Fake()
    try:
        return check_parity(b"", reference, x, tolerance=1e-4, source="test")
    finally:
        export_onnx._ort_session = orig


def test_exporter_choice(monkeypatch):
    assert resolve_exporter("legacy", 17) == "legacy"
    with pytest.raises(ConfigError, match="exporter must be"):
        resolve_exporter("torchscript")
    monkeypatch.setattr(export_onnx, "_have_onnxscript", lambda: False)
    assert resolve_exporter("auto", 18) == "legacy"
    with pytest.raises(SarlocError, match="pip install onnxscript"):
        resolve_exporter("dynamo", 18)
    monkeypatch.setattr(export_onnx, "_have_onnxscript", lambda: True)
    assert resolve_exporter("auto", 18) == "dynamo" and resolve_exporter("auto", 17) == "legacy"
    with pytest.raises(ConfigError, match="opset >= 18"):
        resolve_exporter("dynamo", 17)


def test_cli_export_and_errors(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--exporter", "legacy"]) == 0
    printed = capsys.readouterr().out
    assert "sar_encoder.onnx" in printed and "optical_encoder.onnx" in printed and "parity" in printed
    assert read_model_manifest(out / "sar_encoder.onnx")["exporter"] == "legacy"
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    bad = tmp_path / "bad.pt"
    shutil.copy(tiny_checkpoint, bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    assert main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt or truncated" in err[0]


def test_lint_flags_scatter_without_reduction():
    from onnx import TensorProto, helper

    from sarloc.export.onnx import lint_graph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 1])
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    plain = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="s")
    added = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="s", reduction="add")
    notes = lint_graph(helper.make_model(helper.make_graph([plain], "g", [x, i, u], [y])))
    assert len(notes) == 1 and "index_add" in notes[0]
    assert lint_graph(helper.make_model(helper.make_graph([added], "g", [x, i, u], [y]))) == []


def test_exporter_failure_is_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unsupported op aten::frobnicate\nlong trace...")

    monkeypatch.setattr(export_onnx, "_run_exporter", boom)
    with pytest.raises(ArtifactError) as e:
        export_checkpoint(tiny_checkpoint, tmp_path / "x", exporter="legacy", parity_windows=2)
    assert "\n" not in str(e.value) and "aten::frobnicate" in str(e.value) and "--exporter dynamo" in str(e.value)
