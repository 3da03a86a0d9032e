"""Mixed precision (``TrainConfig.precision``, ``sarloc train --precision``): bf16 on CPU, fp16 refused on CPU,
the FP32 parts, the recorded precision and bit-identical resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
from helpers import fast_train_config, train_argv

torch = pytest.importorskip("torch")

import sarloc.trainer.loop as loop  # noqa: E402
from sarloc.cli import main  # noqa: E402
from sarloc.core.errors import ConfigError  # noqa: E402
from sarloc.core.scene import load_scene  # noqa: E402
from sarloc.trainer.checkpoint import load_checkpoint, load_resume  # noqa: E402
from sarloc.trainer.config import TrainConfig, resolve_config  # noqa: E402
from sarloc.trainer.data.pairs import PairSampler  # noqa: E402
from sarloc.trainer.losses import (  # noqa: E402
    Critic,
    ModalityClassifier,
    batch_hard_triplet,
    critic_loss,
    info_nce,
    modality_adversarial_loss,
    wasserstein_estimate,
)
from sarloc.trainer.models.encoder import CrossModalEncoder  # noqa: E402
from sarloc.trainer.steps import recalibrate_bn  # noqa: E402

#: a quick precise-BN pass, as in tests/trainer/test_resume.py
FAST = {"bn_recalib_batches": 2}


pytestmark = pytest.mark.usefixtures("unbound_sarloc_logging")


@pytest.fixture(autouse=True)
def _interrupts_enabled():
    """Ctrl-C as in a terminal (a test run in the background inherits SIGINT ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture
def fast_config(tmp_path):
    return fast_train_config(tmp_path)


_argv = train_argv


def _signal_at(monkeypatch, step: int) -> None:
    """SIGINT to this process right after training step ``step``."""
    orig = loop._train_step

    def step_then_signal(run, cfg, s):
        logs = orig(run, cfg, s)
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    monkeypatch.setattr(loop, "_train_step", step_then_signal)


def _weights(ckpt):
    return load_checkpoint(ckpt)[0].state_dict()


def _same_weights(a, b) -> bool:
    sa, sb = _weights(a), _weights(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _last_loss(run_dir) -> float:
    return json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[-1])["loss"]


def test_bf16_training_on_cpu_is_finite_close_to_fp32_and_keeps_fp32_weights(synth_scene, tmp_path):
    losses = {}
    for prec in ("fp32", "bf16"):  # the joint refiner too: every forward pass of a step
        cfg = resolve_config("smoke", precision=prec, refiner_weight=0.5, **FAST)
        ckpt = loop.train([synth_scene], tmp_path / prec, cfg, progress=False)
        losses[prec] = _last_loss(tmp_path / prec)
        _, cfg2, info = load_checkpoint(ckpt)
        assert cfg2.precision == prec and info["precision"] == prec
        assert json.loads((tmp_path / prec / "config.json").read_text())["train"]["precision"] == prec
        assert json.loads((tmp_path / prec / "resume.json").read_text())["info"]["precision"] == prec
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] != losses["fp32"]  # it did run in bfloat16
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * abs(losses["fp32"]), losses
    # the weights stay FP32 parameters (what `sarloc export` reads), with the FP32 run's keys and dtypes
    w16, w32 = _weights(tmp_path / "bf16" / "checkpoint.pt"), _weights(tmp_path / "fp32" / "checkpoint.pt")
    assert {k: v.dtype for k, v in w16.items()} == {k: v.dtype for k, v in w32.items()}
    assert {v.dtype for v in w16.values() if v.is_floating_point()} == {torch.float32}


def test_losses_and_precise_bn_stay_fp32_under_autocast(synth_scene):
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 32, generator=gen), dim=1)
    g = torch.nn.functional.normalize(q + 0.3 * torch.randn(8, 32, generator=gen), dim=1)
    targets, pos = torch.eye(8), torch.eye(8, dtype=torch.bool)
    torch.manual_seed(0)
    critic, clf = Critic(32), ModalityClassifier(32)

    def run_all():
        torch.manual_seed(1)  # the gradient penalty's interpolates
        return [
            info_nce(q, g, targets, 0.07),
            batch_hard_triplet(q, g, pos, 0.3),
            wasserstein_estimate(critic, g, q),
            critic_loss(critic, g, q, 10.0),
            modality_adversarial_loss(clf, g, q),
        ]

    plain = run_all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run_all()
    assert [t.dtype for t in mixed] == [torch.float32] * 5
    assert all(torch.equal(a, b) for a, b in zip(plain[:4], mixed[:4], strict=True))  # the same FP32 computation
    assert abs(plain[4].item() - mixed[4].item()) < 0.02  # the classifier itself runs in bfloat16
    # precise BN: the same statistics when called under autocast
    cfg = resolve_config("smoke")
    stats = []
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
        torch.manual_seed(0)
        model = CrossModalEncoder(cfg.encoder)
        sampler = PairSampler([load_scene(synth_scene)], 64, 8, cfg.preprocess, cfg.augment, 1, seed=5)
        with ctx:
            recalibrate_bn(model, sampler, 2, torch.device("cpu"))
        stats.append([b.clone() for n, b in model.named_buffers() if n.endswith("running_var")])
    assert all(torch.equal(a, b) for a, b in zip(*stats, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a CUDA GPU")
def test_fp16_on_cpu_is_refused_with_one_line(synth_scene, tmp_path, capsys, fast_config):
    with pytest.raises(ConfigError) as ei:
        loop.train([synth_scene], tmp_path / "run", resolve_config("smoke", precision="fp16", **FAST))
    msg = str(ei.value)
    assert "\n" not in msg and "precision = 'fp16'" in msg and "use bf16 or fp32 on CPU" in msg
    assert not (tmp_path / "run" / "train_log.jsonl").exists()  # refused before anything was written
    assert main(_argv(synth_scene, tmp_path / "cli", fast_config, "--precision", "fp16")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use bf16 or fp32 on CPU" in err


def test_precision_option_in_config_and_cli():
    assert TrainConfig().precision == "fp32"
    cfg = resolve_config("smoke", precision="bf16")
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = {k: v for k, v in resolve_config("smoke").to_dict().items() if k != "precision"}
    assert TrainConfig.from_dict(old).precision == "fp32"  # checkpoints written before the option: FP32
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_config("smoke", precision="fp8")
    with pytest.raises(SystemExit):
        main(["train", "--scenes", "x", "--out", "y", "--precision", "fp8"])


def test_bf16_resume_is_bit_identical_and_keeps_its_precision(synth_scene, tmp_path, monkeypatch, capsys, fast_config):
    bf16 = ("--precision", "bf16")
    assert main(_argv(synth_scene, tmp_path / "whole", fast_config, *bf16)) == 0
    out = tmp_path / "cut"
    _signal_at(monkeypatch, 2)
    assert main(_argv(synth_scene, out, fast_config, *bf16)) == 130
    assert "--precision bf16" in capsys.readouterr().err.strip().splitlines()[-1]  # in the printed command
    monkeypatch.undo()
    # another precision changes what is learned: refused, naming the key
    assert main(_argv(synth_scene, out, fast_config, "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision = 'fp32' differs from the 'bf16'" in err
    assert main(_argv(synth_scene, out, fast_config, *bf16, "--resume")) == 0
    _, cfg, info = load_checkpoint(out / "checkpoint.pt")
    assert cfg.precision == "bf16" and info["precision"] == "bf16" and info["resumed_from"] == [3]
    assert _same_weights(tmp_path / "whole" / "checkpoint.pt", out / "checkpoint.pt")


def test_fp16_gradient_scaler_is_saved_and_restored(synth_scene, tmp_path, monkeypatch):
    """The fp16 scaler's state in resume.pt, on CPU with the CUDA-only check lifted (the GPU path is not run here).
    With growth_interval 1 the scale moves at every step (doubled, or halved on an overflow), so after an odd
    number of steps it differs from a fresh scaler's and a resume that forgot it would end elsewhere."""

    def scaler(cfg, device):
        return torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=1)

    monkeypatch.setattr(loop, "check_precision", lambda cfg, device: None)
    monkeypatch.setattr(loop, "make_scaler", scaler)
    orig_step = loop._train_step
    cfg = resolve_config("smoke", precision="fp16", align="classifier", **FAST)
    loop.train([synth_scene], tmp_path / "whole", cfg, progress=False)
    _signal_at(monkeypatch, 2)
    with pytest.raises(loop.TrainingInterrupted):
        loop.train([synth_scene], tmp_path / "cut", cfg, progress=False)
    _, info, blob = load_resume(tmp_path / "cut" / "resume.pt")
    assert info["step"] == 3 and info["precision"] == "fp16"
    assert blob["scaler"] != scaler(cfg, torch.device("cpu")).state_dict()
    monkeypatch.setattr(loop, "_train_step", orig_step)
    loop.train([synth_scene], tmp_path / "cut", cfg, progress=False, resume=True)
    assert _same_weights(tmp_path / "whole" / "checkpoint.pt", tmp_path / "cut" / "checkpoint.pt")
    ends = [load_resume(tmp_path / r / "resume.pt")[2]["scaler"] for r in ("whole", "cut")]
    assert ends[0] == ends[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_on_a_cuda_gpu(synth_scene, tmp_path):
    """bf16 and fp16 on a GPU: finite losses near FP32's, the fp16 scaler in resume.pt, FP32 weights (not run on
    this project's CPU machines)."""
    losses = {}
    for prec in ("fp32", "bf16", "fp16"):
        if prec == "bf16" and not torch.cuda.is_bf16_supported(False):
            continue
        cfg = resolve_config("smoke", precision=prec, refiner_weight=0.5, align="classifier", **FAST)
        ckpt = loop.train([synth_scene], tmp_path / prec, cfg, progress=False)
        losses[prec] = _last_loss(tmp_path / prec)
        assert {v.dtype for v in _weights(ckpt).values() if v.is_floating_point()} == {torch.float32}
        assert ("scaler" in load_resume(tmp_path / prec / "resume.pt")[2]) == (prec == "fp16")
    for loss in losses.values():
        assert math.isfinite(loss) and abs(loss - losses["fp32"]) < 0.05 * abs(losses["fp32"]), losses
