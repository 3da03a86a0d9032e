import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sarloc.core.errors import ArtifactError, ConfigError  # noqa: E402
from sarloc.core.scene import load_scene  # noqa: E402
from sarloc.eval.retrieval import EvalConfig  # noqa: E402
from sarloc.trainer.checkpoint import load_checkpoint  # noqa: E402
from sarloc.trainer.config import TrainConfig, resolve_config  # noqa: E402
from sarloc.trainer.data.pairs import PairSampler  # noqa: E402
from sarloc.trainer.loop import evaluate_checkpoint, lr_at, train  # noqa: E402
from sarloc.trainer.losses import info_nce  # noqa: E402
from sarloc.trainer.models.encoder import CrossModalEncoder  # noqa: E402


def test_presets_and_config_roundtrip():
    cfg = resolve_config("smoke", align="classifier")
    assert cfg.align == "classifier" and cfg.encoder.pretrained is False
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match=r"training config: unknown key\(s\) bogus; accepted: .*window_px"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="align"):
        resolve_config("smoke", align="magic")
    with pytest.raises(ConfigError, match="in_channels"):
        resolve_config("smoke", preprocess={"n_orient": 2})  # 3 channels vs 10
    d = resolve_config("default")
    assert lr_at(0, d) < lr_at(d.warmup_steps, d) and lr_at(d.steps - 1, d) < 0.1 * d.lr


def test_pair_sampler_targets(synth_scene):
    s = load_scene(synth_scene)
    cfg = resolve_config("smoke")
    b = PairSampler([s], 64, 16, cfg.preprocess, cfg.augment, scenes_per_batch=1, seed=0).sample()
    assert b.sar.shape == (16, 10, 64, 64) and b.optical.shape == (16, 10, 64, 64)
    assert np.allclose(np.diag(b.targets), 1.0)
    assert ((b.targets > 0) == (b.pos_mask | b.semi_mask)).all()
    assert np.isfinite(b.sar).all()


@pytest.mark.slow
def test_tiny_training_lowers_loss_and_checkpoint_roundtrip(synth_scene, tmp_path):
    cfg = resolve_config("smoke", steps=25, lr=2e-3, batch_size=16, align="wasserstein", seed=0)
    s = load_scene(synth_scene)
    fixed = PairSampler([s], cfg.window_px, 16, cfg.preprocess, cfg.augment, 1, seed=123).sample()
    torch.manual_seed(cfg.seed)
    init = CrossModalEncoder(cfg.encoder).eval()

    def loss_of(m):
        with torch.no_grad():
            zs, zo = m(torch.from_numpy(fixed.sar), torch.from_numpy(fixed.optical))
            return info_nce(zs, zo, torch.from_numpy(fixed.targets), cfg.temperature).item()

    before = loss_of(init)
    ckpt = train([synth_scene], tmp_path / "run", cfg, progress=False)
    model, cfg2, info = load_checkpoint(ckpt)
    assert cfg2 == cfg and info["steps_done"] == 25
    after = loss_of(model)
    assert after < before - 0.05, (before, after)
    assert (tmp_path / "run" / "config.json").is_file()
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert "w1" in log[-1] and "critic" in log[-1]
    res = evaluate_checkpoint(ckpt, synth_scene, EvalConfig(window_px=64, queries=20))
    for k in ("aligned", "arbitrary", "arbitrary_overlap50"):
        for key in (
            "recall@1",
            "recall@5",
            "recall@10",
            "median_error_m",
            "p90_error_m",
            "within_50m",
            "within_100m",
            "within_200m",
            "queries",
            "window_px",
            "gsd_m",
            "ms_per_query",
        ):
            assert key in res[k]
    from sarloc.trainer.figures import embedding_projection, retrieval_figure

    png = retrieval_figure(ckpt, synth_scene, tmp_path / "fig" / "retrieval.png", n_queries=2)
    png2 = embedding_projection(ckpt, synth_scene, tmp_path / "fig" / "proj.png", baseline_checkpoint=ckpt)
    assert png.read_bytes()[:4] == b"\x89PNG" and png2.stat().st_size > 1000
    # a tampered checkpoint is refused
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_checkpoint(ckpt)
    ckpt.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


@pytest.mark.slow
def test_class_adversary_runs(synth_scene, tmp_path):
    cfg = resolve_config("smoke", steps=3, align="classifier")
    ckpt = train([synth_scene], tmp_path / "run", cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert "modality_bce" in log[-1]
    assert ckpt.is_file()


@pytest.mark.slow
def test_ddp_two_processes_gloo(synth_scenes, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "sarloc.cli",
        "train",
        "--scenes",
        str(synth_scenes),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--steps",
        "4",
        "--refiner",
        "--no-progress",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, _, info = load_checkpoint(out / "checkpoint.pt")
    assert info["world_size"] == 2 and info["steps_done"] == 4
    assert info["joint_refiner"]["k"] == 10  # the jointly trained refiner's gradients go through DDP too
    from sarloc.trainer.checkpoint import load_joint_refiner

    assert load_joint_refiner(out / "checkpoint.pt") is not None
