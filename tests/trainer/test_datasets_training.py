"""Training on public datasets: the mixed sampler (sharded, deterministic, resumable) and ``sarloc train --dataset``
end to end on generated samples (the writers of ``test_datasets.py``)."""

from __future__ import annotations

import json
import logging
import os
import signal

import numpy as np
import pytest
from helpers import write_plain_scene
from test_datasets import write_geotiff, write_qxs, write_sen12, write_sen12ms

from sarloc.core.errors import ConfigError
from sarloc.core.preprocess import PreprocessConfig
from sarloc.core.scene import load_scene
from sarloc.trainer.data.datasets import MixedSampler, open_dataset, training_data
from sarloc.trainer.data.pairs import AugmentConfig, PairSampler

PREP = PreprocessConfig(n_orient=2)
WIN = 32


def _kw(**kw):
    base = dict(window_px=WIN, batch_size=8, prep=PREP, aug=AugmentConfig(), scenes_per_batch=2, seed=3)
    return {**base, **kw}


def _drawn(sampler: MixedSampler) -> set:
    return {k for k in sampler._cache._d}


def test_batches_from_a_dataset_are_deterministic_and_resumable(tmp_path):
    root = write_sen12ms(tmp_path / "SEN12MS")
    scenes, sampler, infos = training_data([], [f"sen12ms:{root}"], **_kw())
    assert [s.name for s in scenes] == [f"sen12ms:{root} [all, 4 pairs]"]
    assert infos[0]["pairs"] == 4 and infos[0]["split"] == "all" and infos[0]["root"] == str(root)
    b = sampler.sample()
    assert b.sar.shape == (8, 3, WIN, WIN) and b.optical.shape == (8, 3, WIN, WIN)
    assert np.allclose(np.diag(b.targets), 1.0) and ((b.targets > 0) == (b.pos_mask | b.semi_mask)).all()
    state = sampler.rng.bit_generator.state
    nxt = sampler.sample()
    _, again, _ = training_data([], [f"sen12ms:{root}"], **_kw())
    assert np.array_equal(again.sample().sar, b.sar)  # same seed, same batches
    again.rng.bit_generator.state = state  # what --resume restores
    assert np.array_equal(again.sample().sar, nxt.sar) and np.array_equal(
        again.sample().optical, sampler.sample().optical
    )


def test_two_ranks_draw_disjoint_pairs(tmp_path):
    root = write_qxs(tmp_path / "q", n=8)
    drawn = []
    for rank in (0, 1):
        _, sampler, _ = training_data([], [f"qxs-saropt:{root}"], **_kw(rank=rank, world=2))
        for _ in range(12):
            sampler.sample()
        drawn.append({sampler.sources[0].pairs[i][0] for _, i in _drawn(sampler)})
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    assert len(drawn[0] | drawn[1]) <= 8


def test_scenes_and_datasets_mix_in_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    scene = load_scene(
        write_plain_scene(
            tmp_path / "plain",
            (rng.random((96, 96, 3)) * 255).astype(np.uint8),
            rng.random((96, 96)).astype(np.float32) + 0.01,
        )
    )
    sen = write_sen12(tmp_path / "SEN1-2")
    qxs = write_qxs(tmp_path / "QXS")
    scenes, sampler, infos = training_data([scene], [f"sen1-2:{sen}", str(qxs)], **_kw(scenes_per_batch=4))
    assert scenes[0].name == "plain" and [i["name"] for i in infos] == ["sen1-2", "qxs-saropt"]
    assert isinstance(sampler.scene_sampler, PairSampler) and sampler.scene_sampler.rng is sampler.rng
    kinds = set()
    for _ in range(6):
        b = sampler.sample()
        assert b.sar.shape[0] == 8 and b.targets.shape == (8, 8)
        same = b.scene_idx[:, None] == b.scene_idx[None, :]
        assert not (b.targets[~same] > 0).any()  # positives never across scenes / pairs
        kinds |= {d for d, _ in _drawn(sampler)}
    assert kinds == {0, 1}  # both datasets were drawn
    assert sampler.scene_sampler.batch_size == 8  # restored after each scene part


def test_bad_pairs_and_small_pairs(tmp_path, caplog):
    root = write_sen12ms(tmp_path / "SEN12MS", merged_season=False)
    src = open_dataset("sen12ms", root)
    src.paths(2)[0].write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="sarloc"):
        _, sampler, _ = training_data([], [src], **_kw(seed=0))
        for _ in range(8):
            sampler.sample()
    assert (0, 2) in sampler._bad and (0, 2) not in _drawn(sampler)
    assert sum("skipping an unreadable pair" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ConfigError, match=r"pairs are 48x48 px, smaller than the 64-px window; use --window-px 48"):
        training_data([], [src], **_kw(window_px=64))


def test_the_digest_follows_the_data(tmp_path):
    from sarloc.trainer.resume import scenes_digest

    root = write_sen12ms(tmp_path / "SEN12MS", merged_season=False)
    before, _, _ = training_data([], [f"sen12ms:{root}"], **_kw())
    p = root / "ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p9.tif"
    write_geotiff(p, np.zeros((48, 48, 2), np.float32), 10.0)
    write_geotiff(root / "ROIs1158_spring_s2/s2_1/ROIs1158_spring_s2_1_p9.tif", np.ones((48, 48, 13), np.uint16), 10.0)
    after, _, _ = training_data([], [f"sen12ms:{root}"], **_kw())
    assert scenes_digest(before) != scenes_digest(after)


# --- sarloc train --dataset, end to end --------------------------------------------------------------------------

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("unbound_sarloc_logging")


def _train(out, *data, extra=()):
    from sarloc.cli import main

    cfg = out.parent / "fast.json"
    cfg.write_text(json.dumps({"bn_recalib_batches": 1, "threads": 1}))
    argv = ["train", *data, "--out", str(out), "--preset", "smoke", "--config", str(cfg), "--no-progress"]
    return main([*argv, "--steps", "2", *extra])


def test_sarloc_train_on_a_dataset_alone_and_mixed_with_scenes(tmp_path, capsys):
    from sarloc.trainer.checkpoint import load_checkpoint

    root = write_sen12ms(tmp_path / "SEN12MS", px=64)
    assert _train(tmp_path / "r1", "--dataset", f"sen12ms:{root}") == 0
    conf = json.loads((tmp_path / "r1" / "config.json").read_text())
    assert conf["scenes"] == [f"sen12ms:{root} [all, 4 pairs]"]
    (d,) = conf["datasets"]
    assert d["name"] == "sen12ms" and d["root"] == str(root) and d["pairs"] == 4 and len(d["sha256"]) == 64
    _, _, info = load_checkpoint(tmp_path / "r1" / "checkpoint.pt")
    assert info["steps_done"] == 2 and info["scenes"] == conf["scenes"]
    manifest = json.loads((tmp_path / "r1" / "checkpoint.json").read_text())
    assert manifest["parent_sha256"] == info["scenes_sha256"]

    rng = np.random.default_rng(1)
    plain = write_plain_scene(
        tmp_path / "scenes" / "plain",
        (rng.random((96, 96, 3)) * 255).astype(np.uint8),
        rng.random((96, 96)).astype(np.float32) + 0.01,
    )
    sen = write_sen12(tmp_path / "SEN1-2", px=64)
    assert _train(tmp_path / "r2", "--scenes", str(plain), "--dataset", f"sen1-2@spring:{sen}", str(root)) == 0
    conf2 = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert conf2["scenes"][0] == "plain" and [x["name"] for x in conf2["datasets"]] == ["sen1-2", "sen12ms"]
    assert conf2["datasets"][0]["split"] == "spring" and conf2["datasets"][0]["pairs"] == 3
    other = json.loads((tmp_path / "r2" / "checkpoint.json").read_text())["parent_sha256"]
    assert other != manifest["parent_sha256"]

    capsys.readouterr()
    assert _train(tmp_path / "r3") == 1
    assert "sarloc train: error: give --scenes, --dataset or both" in capsys.readouterr().err
    assert _train(tmp_path / "r4", "--dataset", str(tmp_path / "scenes")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sarloc train: error: ") and "matches no known dataset layout" in err and "\n" not in err


def test_an_interrupted_dataset_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    import sarloc.trainer.loop as loop
    from sarloc.trainer.checkpoint import load_checkpoint

    root = write_sen12ms(tmp_path / "SEN12MS", px=64)
    spec = ("--dataset", f"sen12ms:{root}")
    assert _train(tmp_path / "whole", *spec, extra=["--steps", "4"]) == 0
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    orig = loop._train_step

    def step_then_signal(run, cfg, s):
        logs = orig(run, cfg, s)
        if s == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    try:
        monkeypatch.setattr(loop, "_train_step", step_then_signal)
        assert _train(tmp_path / "cut", *spec, extra=["--steps", "4"]) == 130
        monkeypatch.undo()
        assert f"--dataset sen12ms:{root}" in capsys.readouterr().err  # the printed resume command
        assert _train(tmp_path / "cut", *spec, extra=["--steps", "4", "--resume"]) == 0
    finally:
        signal.signal(signal.SIGINT, old)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")[0].state_dict()
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    write_sen12ms(tmp_path / "SEN12MS", px=64, n=5)  # one more pair: the data changed
    assert _train(tmp_path / "cut", *spec, extra=["--steps", "4", "--resume"]) == 1
    assert "differ from those of" in capsys.readouterr().err
