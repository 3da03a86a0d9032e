"""Periodic resumable checkpoints, Ctrl-C / SIGTERM, ``--resume``, and a reused ``--out`` (``sarloc train``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import fast_train_config, train_argv

torch = pytest.importorskip("torch")

import sarloc.trainer.loop as loop  # noqa: E402
from sarloc.cli import main  # noqa: E402
from sarloc.core.errors import ConfigError  # noqa: E402
from sarloc.trainer.checkpoint import RESUME_KIND, load_checkpoint, load_resume  # noqa: E402
from sarloc.trainer.config import config_changes, resolve_config  # noqa: E402

#: a quick precise-BN pass: the tests look at the loop, not at the final statistics
FAST = {"bn_recalib_batches": 2}


pytestmark = pytest.mark.usefixtures("unbound_sarloc_logging")


@pytest.fixture
def fast_config(tmp_path):
    return fast_train_config(tmp_path)


_argv = train_argv


def _signal_at(monkeypatch, step: int, sig: int, repeat_after_s: float | None = None) -> None:
    """Send ``sig`` to this process right after training step ``step`` (and again ``repeat_after_s`` later)."""
    orig = loop._train_step

    def step_then_signal(run, cfg, s):
        logs = orig(run, cfg, s)
        if s == step:
            os.kill(os.getpid(), sig)
            if repeat_after_s is not None:
                time.sleep(repeat_after_s)
                os.kill(os.getpid(), sig)
        return logs

    monkeypatch.setattr(loop, "_train_step", step_then_signal)


def _same_weights(a, b) -> bool:
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _log_steps(run_dir):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "t_s"} for x in lines]


@pytest.fixture(autouse=True)
def _interrupts_enabled():
    """Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored, and training leaves an
    ignored signal alone (by design), which would make the interrupt tests meaningless."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_periodic_resumable_checkpoints(synth_scene, tmp_path, monkeypatch):
    saved: list[int] = []
    orig = loop.save_resume

    def record(path, cfg, state, info):
        saved.append(info["step"])
        return orig(path, cfg, state, info)

    monkeypatch.setattr(loop, "save_resume", record)
    cfg = resolve_config("smoke", checkpoint_every=2, checkpoint_minutes=0.0, **FAST)
    ckpt = loop.train([synth_scene], tmp_path / "steps", cfg, progress=False)
    assert saved == [2, 4, 6]  # every 2 steps; the end of the loop is saved once
    # the final checkpoint keeps its format and manifest; the resumable state has its own
    _, cfg2, info = load_checkpoint(ckpt)
    assert cfg2 == cfg and info["steps_done"] == 6
    old, rinfo, blob = load_resume(tmp_path / "steps" / "resume.pt")
    man = json.loads((tmp_path / "steps" / "resume.json").read_text())
    assert man["kind"] == RESUME_KIND and man["step"] == 6 and man["parent_sha256"] == info["scenes_sha256"]
    assert old == cfg and rinfo["log_bytes"] == (tmp_path / "steps" / "train_log.jsonl").stat().st_size
    assert {"model", "opt", "adversary", "adv_opt", "rng"} <= blob.keys()
    # by time: a state after every step when the interval is tiny
    saved.clear()
    cfg = resolve_config("smoke", steps=3, checkpoint_minutes=1e-9, **FAST)
    loop.train([synth_scene], tmp_path / "minutes", cfg, progress=False)
    assert saved == [1, 2, 3]


def test_ctrl_c_saves_exits_130_and_resume_equals_an_uninterrupted_run(
    synth_scene, tmp_path, monkeypatch, capsys, fast_config
):
    assert main(_argv(synth_scene, tmp_path / "whole", fast_config)) == 0
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "cut"
    _signal_at(monkeypatch, 2, signal.SIGINT)
    assert main(_argv(synth_scene, out, fast_config)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sarloc train: stopped by SIGINT at step 3/6; saved ")
    assert f"continue with: sarloc train --scenes {synth_scene} --out {out} " in err and err.endswith(" --resume")
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
    assert (out / "resume.pt").is_file() and not (out / "checkpoint.pt").exists()
    assert json.loads((out / "resume.json").read_text())["step"] == 3
    monkeypatch.undo()
    assert main(_argv(synth_scene, out, fast_config, "--resume")) == 0
    _, _, info = load_checkpoint(out / "checkpoint.pt")
    assert info["steps_done"] == 6 and info["resumed_from"] == [3]
    assert _same_weights(tmp_path / "whole" / "checkpoint.pt", out / "checkpoint.pt")
    assert _log_steps(out) == _log_steps(tmp_path / "whole")  # the log continues where it was, without repeats
    assert load_checkpoint(out / "checkpoint.pt")[2]["final_losses"] == info["final_losses"]


def test_sigterm_exits_143_and_a_second_ctrl_c_aborts(synth_scene, tmp_path, monkeypatch, capsys, fast_config):
    _signal_at(monkeypatch, 0, signal.SIGTERM)
    assert main(_argv(synth_scene, tmp_path / "term", fast_config)) == 143
    assert "stopped by SIGTERM at step 1/6; saved" in capsys.readouterr().err
    assert json.loads((tmp_path / "term" / "resume.json").read_text())["step"] == 1
    # a second Ctrl-C (not the launcher's echo of the first) aborts without saving
    monkeypatch.undo()
    _signal_at(monkeypatch, 0, signal.SIGINT, repeat_after_s=1.1)
    assert main(_argv(synth_scene, tmp_path / "abort", fast_config)) == 130
    err = capsys.readouterr().err
    assert "at step 0/6; nothing was saved; start over with --force" in err
    assert not (tmp_path / "abort" / "resume.pt").exists()


def test_reused_out_is_refused_and_force_starts_over(synth_scene, tmp_path, capsys, fast_config):
    out = tmp_path / "run"
    loop.train([synth_scene], out, resolve_config("smoke", steps=2, **FAST), progress=False)
    log_before = (out / "train_log.jsonl").read_text()
    assert main(_argv(synth_scene, out, fast_config)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a training run" in err
    assert "--resume" in err and "--force" in err
    assert (out / "train_log.jsonl").read_text() == log_before  # nothing appended
    assert main(_argv(synth_scene, out, fast_config, "--force")) == 0
    (old,) = out.glob("previous-*")
    assert (old / "train_log.jsonl").read_text() == log_before and (old / "checkpoint.pt").is_file()
    steps = [r["step"] for r in _log_steps(out)]
    assert steps == [0, 2, 4, 5]  # the new run's log alone
    assert load_checkpoint(out / "checkpoint.pt")[2]["steps_done"] == 6
    # an empty log (a run that failed before its first step) does not count as a run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train_log.jsonl").write_text("")
    assert loop.existing_run(empty) == []


def test_resume_refuses_a_changed_config_or_nothing_to_resume(synth_scene, synth_scenes, tmp_path, capsys, fast_config):
    out = tmp_path / "run"
    cfg = resolve_config("smoke", steps=2, **FAST)
    loop.train([synth_scene], out, cfg, progress=False)
    for changed, key in [
        ({"steps": 3}, "steps = 3 differs from the 2"),
        ({"seed": 1}, "seed = 1 differs from the 0"),
        ({"encoder": {"embed_dim": 16}}, "encoder.embed_dim = 16 differs from the 32"),
    ]:
        with pytest.raises(ConfigError, match=key) as ei:
            loop.train([synth_scene], out, resolve_config("smoke", **{"steps": 2, **FAST, **changed}), resume=True)
        assert "\n" not in str(ei.value) and "--force" in str(ei.value)
    with pytest.raises(ConfigError, match="training scenes"):
        loop.train([synth_scenes], out, cfg, progress=False, resume=True)
    # what does not change the result may differ: the run was complete, so only what follows the loop is redone
    free = resolve_config("smoke", steps=2, max_minutes=5.0, threads=1, log_every=1, checkpoint_every=1, **FAST)
    assert not config_changes(cfg, free)
    loop.train([synth_scene], out, free, progress=False, resume=True)
    # the CLI: one line naming the key, and nothing to resume in a fresh folder
    assert main(_argv(synth_scene, out, fast_config, "--steps", "5", "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steps = 5 differs from the 2" in err
    assert main(_argv(synth_scene, tmp_path / "fresh", fast_config, "--resume")) == 1
    assert "resume.pt not found, so there is nothing to resume" in capsys.readouterr().err


def test_eta_respects_the_time_cap():
    cfg = resolve_config("smoke", steps=1000)
    capped = loop._progress_bar(cfg, 0, deadline=time.time() + 2.0)
    free = loop._progress_bar(cfg, 0, deadline=None)
    try:
        for bar in (capped, free):
            time.sleep(0.05)
            bar.update(5)  # about 100 steps/s: 10 s to the last step
        assert capped.format_dict["eta"].endswith("(time cap)") and capped.format_dict["eta"] <= "00:02 (time cap)"
        assert "time cap" not in free.format_dict["eta"]
        resumed = loop._progress_bar(cfg, 400, deadline=None)
        assert resumed.n == 400  # the count continues
        resumed.close()
    finally:
        capped.close()
        free.close()


@pytest.mark.slow
def test_ddp_time_capped_then_resumed_equals_an_uninterrupted_run(synth_scenes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = tmp_path / "fast.json"
    cfg.write_text(json.dumps(FAST))

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
        cmd += ["-m", "sarloc.cli", *_argv(synth_scenes, out, cfg, "--steps", "4", "--refiner", *extra)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    torchrun(tmp_path / "whole")
    torchrun(tmp_path / "cut", "--max-minutes", "0.0001")  # stops after its first step: every rank agrees
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")[2]["steps_done"] == 1
    torchrun(tmp_path / "cut", "--max-minutes", "10", "--resume")  # a larger cap continues the run
    _, _, info = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert info["steps_done"] == 4 and info["world_size"] == 2 and info["resumed_from"] == [1]
    assert _same_weights(tmp_path / "whole" / "checkpoint.pt", tmp_path / "cut" / "checkpoint.pt")
