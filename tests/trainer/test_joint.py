"""Joint (end-to-end) training of the graph refiner with the encoder: in-batch lists, gradients, checkpoint, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sarloc.core.errors import ArtifactError, ConfigError, SarlocError  # noqa: E402
from sarloc.trainer.checkpoint import load_checkpoint, load_joint_refiner  # noqa: E402
from sarloc.trainer.config import resolve_config  # noqa: E402
from sarloc.trainer.joint import augment_offsets, in_batch_lists, joint_refiner_loss, make_refiner  # noqa: E402


def _hand_batch():
    """6 pairs: scene 0 holds pairs 0-3, scene 1 pairs 4-5; unit vectors chosen so similarities are known."""
    z_opt = torch.eye(6)
    z_sar = torch.zeros(6, 6)
    # SAR 0 is most like optical 2, then 1, then 0 (its own), then 3; nothing in scene 1 may be picked
    z_sar[0] = torch.tensor([0.1, 0.5, 0.8, 0.05, 0.9, 0.9])
    z_sar[1, 1] = 1.0
    z_sar[2, 2] = 1.0
    z_sar[3, 3] = 1.0
    z_sar[4] = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.2, 0.1])  # scene 1: optical 0 must not be a candidate
    z_sar[5, 5] = 1.0
    scene = torch.tensor([0, 0, 0, 0, 1, 1])
    xy = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0], [5.0, -1.0]])
    pos = torch.eye(6, dtype=torch.bool)
    return z_sar, z_opt, scene, xy, pos


def test_in_batch_lists_hand_made_case():
    z_sar, z_opt, scene, xy, pos = _hand_batch()
    q, cands, offs, p, idx = in_batch_lists(z_sar, z_opt, scene, xy, pos, k=3)
    assert cands.shape == (6, 3, 6) and offs.shape == (6, 3, 2) and p.shape == (6, 3)
    # query 0: own scene only, in similarity order 2, 1, 0 -> its positive (0) is third
    assert idx[0].tolist() == [2, 1, 0] and p[0].tolist() == [False, False, True]
    # offsets from the top-1 (optical 2 at (0, 2))
    assert torch.allclose(offs[0], torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.0, -2.0]]))
    # query 4 (scene 1, two windows): candidates 4 and 5 only, then padding that is never positive
    assert set(idx[4, :2].tolist()) == {4, 5} and idx[4, 2] == idx[4, 1]
    assert p[4].tolist() == [True, False, False]
    assert torch.equal(q, z_sar)
    # every list holds a positive
    assert bool(p.any(1).all())


def test_in_batch_lists_forces_the_positive_in():
    z_sar, z_opt, scene, xy, pos = _hand_batch()
    _, _, _, p, idx = in_batch_lists(z_sar, z_opt, scene, xy, pos, k=2)
    # query 0's own optical ranks third: it replaces the last of the top 2
    assert idx[0].tolist() == [2, 0] and p[0].tolist() == [False, True]
    with pytest.raises(ValueError):
        in_batch_lists(z_sar, z_opt, scene, xy, pos, k=0)


def test_in_batch_lists_pads_when_the_batch_is_small():
    z_sar, z_opt, scene, xy, pos = _hand_batch()
    _, cands, _, p, idx = in_batch_lists(z_sar, z_opt, scene, xy, pos, k=8)
    assert cands.shape == (6, 8, 6)
    assert int(p.sum(1).max()) == 1  # padding copies are not positives
    assert bool((scene[idx] == scene[:, None]).all())  # never another scene's window


def test_augment_offsets_keeps_distances():
    offs = torch.randn(4, 5, 2)
    o = augment_offsets(offs, torch.Generator().manual_seed(1))
    assert torch.allclose(o.norm(dim=-1), offs.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(o, offs)


def test_joint_loss_reaches_both_encoder_inputs_and_the_refiner():
    torch.manual_seed(0)
    z_sar, z_opt, scene, xy, pos = _hand_batch()
    a = torch.nn.functional.normalize(z_sar + 0.1, dim=1).requires_grad_(True)
    b = torch.nn.functional.normalize(z_opt + 0.1, dim=1).requires_grad_(True)
    ref = make_refiner(6, 3)
    torch.nn.init.normal_(ref.head.weight, std=0.1)
    loss, logs = joint_refiner_loss(ref, a, b, scene, xy, pos, 3, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"refiner", "list_r1_coarse", "list_r1_refined"}
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert b.grad is not None and float(b.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in ref.parameters() if p.requires_grad)


def test_config_validates_refiner_fields():
    assert resolve_config("smoke").refiner_weight == 0.0
    with pytest.raises(ConfigError):
        resolve_config("smoke", refiner_weight=-1.0)
    with pytest.raises(ConfigError):
        resolve_config("smoke", refiner_k=1)


@pytest.mark.slow
def test_joint_training_writes_a_refiner_and_train_refiner_uses_it(synth_scene, tmp_path):
    from sarloc.cli import main
    from sarloc.runtime.refine import OnnxRefiner
    from sarloc.trainer.loop import train

    cfg = resolve_config("smoke", steps=8, batch_size=16, refiner_weight=0.5, refiner_k=6)
    ckpt = train([synth_scene], tmp_path / "run", cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert "refiner" in log[-1] and np.isfinite(log[-1]["refiner"])
    model, cfg2, info = load_checkpoint(ckpt)
    assert cfg2.refiner_weight == 0.5 and info["joint_refiner"]["k"] == 6
    ref = load_joint_refiner(ckpt)
    assert ref is not None and ref.cfg.embed_dim == model.output_dim(cfg.window_px)
    # the refiner learned something: its head is no longer the zero initialisation
    assert float(ref.head.weight.detach().abs().sum()) > 0
    # exported unchanged through the CLI (k defaults to the joint refiner's)
    argv = ["train-refiner", "--checkpoint", str(ckpt), "--scenes", str(synth_scene), "--queries", "20"]
    assert main([*argv, "--steps", "0"]) == 0
    man = json.loads((ckpt.parent / "refiner.json").read_text())
    assert man["info"]["training"] == "joint" and man["config"]["k"] == 6
    # an encoder without a joint refiner cannot export one unchanged
    plain = train([synth_scene], tmp_path / "plain", resolve_config("smoke", steps=2), progress=False)
    assert load_joint_refiner(plain) is None
    with pytest.raises(SarlocError, match="has none"):
        from sarloc.trainer.refiner_train import refine_checkpoint

        refine_checkpoint(plain, [synth_scene], steps=0, queries=10)
    with pytest.raises(SarlocError, match="k=6"):
        refine_checkpoint(ckpt, [synth_scene], k=10, steps=0, queries=10)
    # fine-tuning from the joint refiner is recorded as such
    out = refine_checkpoint(ckpt, [synth_scene], out_dir=tmp_path / "ft", steps=5, queries=20)
    man = json.loads(out["refiner"].with_suffix(".json").read_text())
    assert man["info"]["training"] == "joint + 5 post-hoc steps"
    assert OnnxRefiner(out["refiner"]).k == 6
    # a damaged joint refiner is refused with the checkpoint named
    blob = torch.load(ckpt, weights_only=True)
    blob["refiner_state_dict"].pop("head.bias")
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match=r"bad\.pt"):
        load_joint_refiner(tmp_path / "bad.pt")
