"""Faults: backend failure at run time, SIGKILL mid-flight, disk full, tampered pack, bursts on a network source."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import run_args, subprocess_env

from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR


@pytest.fixture
def flight(demo_flight_dir):
    """The session's demo flight (tests/conftest.py): a generated scene, its map pack, 3 simulated strips."""
    return demo_flight_dir


def _cfg(flight, out, **kw):
    from sarloc.runtime.daemon import load_run_config

    return load_run_config(
        None,
        source=kw.pop("source", f"dir://{flight / 'strips'}"),
        export=str(MODEL_DIR),
        pack=str(flight / "pack"),
        out=str(out),
        follow=False,
        **kw,
    )


class _Broken:
    """An encoder backend that dies at run time (e.g. a CUDA error): same model manifest, raises on call."""

    def __init__(self, inner):
        self.manifest, self.preprocess = inner.manifest, inner.preprocess

    def __call__(self, x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_backend_failure_falls_back_to_onnx_runtime_cpu(flight, caplog):
    from sarloc.runtime.localizer import Localizer

    loc = Localizer.from_paths(MODEL_DIR, flight / "pack", verify_pack=False)
    ok = loc.localize(np.zeros((2, 64, 64), np.float32) + np.random.default_rng(0).random((2, 64, 64)))
    loc.encoder = _Broken(loc.encoder)
    with caplog.at_level("ERROR"):
        res = loc.localize(np.random.default_rng(0).random((2, 64, 64)).astype(np.float32))
    assert len(res) == 2 and loc.stats == {"backend_errors": 1, "backend_fallbacks": 1}
    assert "falling back to ONNX Runtime" in caplog.text
    assert [r.score for r in res] == pytest.approx([r.score for r in ok], abs=1e-4)


def test_sigkill_mid_flight_loses_no_record_and_resume_finishes(flight, tmp_path):
    out = tmp_path / "run"
    args = run_args(flight, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarloc.cli", *args],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rec = out / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (rec.is_file() and rec.read_text().count('"type":"window"') >= 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait(timeout=30)
    lines = rec.read_bytes().splitlines()
    parsed = [json.loads(x) for x in lines]  # every line whole: one write() per record
    assert parsed[0]["type"] == "start" and parsed[-1]["type"] != "stop"
    r = subprocess.run(
        [sys.executable, "-m", "sarloc.cli", *args, "--resume", "--no-follow"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fixes = [json.loads(x) for x in rec.read_bytes().splitlines() if b'"type":"fix"' in x]
    assert sorted(f["strip_id"] for f in fixes) == ["strip_0000", "strip_0001", "strip_0002"]


def test_disk_full_for_the_log_degrades_and_keeps_going(flight, tmp_path):
    from sarloc.runtime.daemon import run

    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full not available on this system")
    out = tmp_path / "run"
    out.mkdir()
    (out / "records.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    stats = run(_cfg(flight, out), install_signals=False)
    assert stats["strips"] == 3 and stats["fixes"] == 3
    assert stats["record_errors"] > 0
    assert stats["trusted_fixes"] >= 2  # localisation went on


def test_tampered_pack_is_refused_at_start(flight, tmp_path):
    import shutil

    from sarloc.cli import main

    pack = tmp_path / "pack"
    shutil.copytree(flight / "pack", pack)
    emb = pack / "embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-100] ^= 0x40
    emb.write_bytes(bytes(data))
    rc = main(run_args(flight, tmp_path / "run", "--no-follow", pack=pack))
    assert rc == 1
    assert (
        not (tmp_path / "run" / "records.jsonl").exists()
        or "fix" not in (tmp_path / "run" / "records.jsonl").read_text()
    )


def test_burst_on_a_network_source_drops_oldest_and_survives(flight, tmp_path):
    from sarloc.runtime.daemon import run
    from sarloc.runtime.strips import StripFile
    from sarloc.sim.senders import send_strip_udp

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(flight, tmp_path / "run", source=f"udp://127.0.0.1:{port}", queue_blocks=3, source_idle_timeout_s=3.0)
    result = {}
    t = threading.Thread(target=lambda: result.update(run(cfg, install_signals=False)), daemon=True)
    t.start()
    time.sleep(1.5)  # the daemon binds the port while loading the model and pack
    strips = [StripFile(p).read() for p in sorted((flight / "strips").glob("strip_*.npy"))]
    burst = []
    for k in range(4):  # 12 strips at once, far faster than real time
        for st in strips:
            burst.append(
                type(st)(
                    type(st.meta)(**{**st.meta.to_dict(), "strip_id": f"{st.meta.strip_id}_{k}"}), st.pixels, 0, True
                )
            )
    send_strip_udp(burst, "127.0.0.1", port, pace_s=0.0005)
    t.join(timeout=180)
    assert not t.is_alive()
    assert result["blocks_dropped"] > 0  # bounded queue: drops counted, oldest first
    assert result["strips"] >= 1 and result["errors"] == 0


def test_localizer_rescore_option_runs_and_keeps_the_fixes(flight):
    """``LocalizerConfig.rescore`` (full-resolution look at the shortlist's top N) localises the same windows at
    least as well here (windows cut from the scene's SAR at known places), and its time shows in the shortlist."""
    from sarloc.core.scene import load_scene
    from sarloc.runtime.localizer import Localizer, LocalizerConfig

    sar = load_scene(flight / "scene").sar_gray
    origins = np.random.default_rng(1).integers(0, min(sar.shape) - 64, (8, 2))
    wins = np.stack([sar[y : y + 64, x : x + 64] for x, y in origins]).astype(np.float32)
    right = {}
    for rescore in (0, 40):
        loc = Localizer.from_paths(MODEL_DIR, flight / "pack", LocalizerConfig(rescore=rescore), verify_pack=False)
        res = loc.localize(wins)
        assert len(res) == len(wins) and all("shortlist" in r.stage_ms for r in res)
        right[rescore] = sum(
            r.xy_px is not None and np.abs(np.array(r.xy_px) - (o + 32.0)).max() <= 3.0
            for r, o in zip(res, origins, strict=True)
        )
    assert right[0] >= 4 and right[40] >= right[0] - 1
