"""The onboard daemon end to end: shipped demo model, generated scene, simulated flight, MAVLink, replay."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_args, subprocess_env

from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
from sarloc.core.errors import ConfigError
from sarloc.eval.replay import read_records


@pytest.fixture
def flight(demo_flight_dir):
    """The session's demo flight (tests/conftest.py): a generated scene, its map pack, 3 simulated strips."""
    return demo_flight_dir


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


NO_TORCH_RUN = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # the runtime must run without torch
    from sarloc.cli import main
    rc = main(sys.argv[1:])
    assert sys.modules["torch"] is None
    sys.exit(rc)
    """
)


def test_run_without_torch_sends_mavlink_and_replays_identically(flight, tmp_path):
    from pymavlink import mavutil

    from sarloc.eval.replay import replay
    from sarloc.eval.report import load_truth, score_fixes, truth_at

    port = _free_udp_port()
    rx = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=255, dialect="common")
    out = tmp_path / "run"
    args = run_args(flight, out, "--no-follow", "--mavlink", f"udpout:127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH_RUN, *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    got = {"HEARTBEAT": [], "GPS_INPUT": []}
    deadline = time.time() + 240
    while time.time() < deadline:
        m = rx.recv_match(type=["HEARTBEAT", "GPS_INPUT"], blocking=True, timeout=0.2)
        if m is not None:
            got[m.get_type()].append(m)
        if proc.poll() is not None and m is None:
            break
    _, err = proc.communicate(timeout=30)
    rx.close()
    assert proc.returncode == 0, err[-3000:]
    recs = _records(out / "records.jsonl")
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "stop"
    fixes = [r for r in recs if r["type"] == "fix"]
    assert len(fixes) == 3
    assert sum(r["type"] == "window" for r in recs) >= 3 * 6
    # every window record lists its refined candidates, the chosen one among them with the record's confidence
    for w in (r for r in recs if r["type"] == "window" and r["xy_m"] is not None):
        alts = np.asarray(w["alternatives"])
        assert alts.shape[1] == 6 and 1 <= len(alts) <= 10, alts.shape
        chosen = np.flatnonzero(np.abs(alts[:, :2] - w["xy_m"]).max(1) < 0.05)
        assert len(chosen) >= 1 and np.isclose(alts[chosen[0], 2], w["confidence"], atol=1e-4), (alts, w)
    # accuracy on this generated flight: trusted fixes are right (metre-level), and most strips are trusted
    truth = load_truth(flight / "strips" / "truth.json")
    stats = score_fixes(fixes, truth)
    assert stats["n_trusted"] >= 2, stats
    assert stats["median_m"] < 30.0, stats
    assert stats["false_fix_rate"] == 0.0, stats
    # MAVLink: our heartbeat (onboard controller, component 191) and GPS_INPUT near the truth once fixed
    assert got["HEARTBEAT"] and all(m.get_srcComponent() == 191 for m in got["HEARTBEAT"])
    valid = [m for m in got["GPS_INPUT"] if m.fix_type >= 3]
    assert valid, f"no 3-D GPS_INPUT among {len(got['GPS_INPUT'])}"
    from sarloc.mappack.pack import MapPack

    pack = MapPack(flight / "pack")
    import pyproj

    tr = pyproj.Transformer.from_crs("EPSG:4326", pack.metric_crs, always_xy=True)
    # every 3-D fix sent lies on the true track (GPS_INPUT carries wall-clock time, so compare with the whole path)
    t0, t1 = truth["strips"][0]["t0_s"], truth["strips"][-1]["t_end_s"]
    path = truth_at(truth, np.linspace(t0, t1, 2000))
    for m in valid:
        x, y = tr.transform(m.lon / 1e7, m.lat / 1e7)
        assert np.min(np.hypot(path[:, 0] - x, path[:, 1] - y)) < 50.0
        heading = np.degrees(np.arctan2(m.ve, m.vn)) % 360
        assert abs(heading - 30.0) < 10.0, heading
    assert all(m.fix_type < 3 or m.horiz_accuracy > 0 for m in got["GPS_INPUT"])
    # replay: same fixes
    res = replay(out / "records.jsonl", tmp_path / "replay")
    assert res["identical"], res


def test_strip_that_matches_nothing_abstains(flight, tmp_path):
    """Strips of another generated scene (not in the pack): windows and fixes are untrusted, nothing is sent."""
    from sarloc.runtime.daemon import load_run_config, run
    from sarloc.sim.flight import simulate_flight
    from sarloc.sim.scenes import SynthConfig, write_scene

    other = write_scene(tmp_path / "other", SynthConfig(width_px=384, height_px=384, seed=77))
    simulate_flight(
        other,
        tmp_path / "strips",
        track="straight",
        heading_deg=0.0,
        n_strips=2,
        strip_width_px=160,
        strip_rows=160,
        seed=2,
    )
    cfg = load_run_config(
        None,
        source=f"dir://{tmp_path / 'strips'}",
        export=str(MODEL_DIR),
        pack=str(flight / "pack"),
        out=str(tmp_path / "run"),
        follow=False,
    )
    run(cfg, install_signals=False)
    recs = _records(tmp_path / "run" / "records.jsonl")
    wins = [r for r in recs if r["type"] == "window"]
    fixes = [r for r in recs if r["type"] == "fix"]
    assert len(fixes) == 2 and wins
    assert not any(r["trusted"] for r in fixes)
    # single windows can still match a look-alike (generated scenes share their building blocks: 31% of these
    # windows did with the demo model); the strip consensus is what keeps them from becoming positions
    assert np.mean([w["trusted"] for w in wins]) < 0.6


def test_sigterm_mid_flight_loses_no_record_and_resume_finishes(flight, tmp_path):
    out = tmp_path / "run"
    args = run_args(flight, out)  # follow: runs until stopped
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarloc.cli", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rec = out / "records.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (rec.is_file() and '"type":"window"' in rec.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # mid-strip: it finishes this strip, writes its fix, stops
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    recs = _records(rec)  # every line parses: nothing half-written
    assert recs[-1]["type"] == "stop"
    fixes = [r for r in recs if r["type"] == "fix"]
    assert 1 <= len(fixes) < 3
    for f in fixes:  # the strips it started were finished
        assert f["n_windows"] == sum(1 for r in recs if r["type"] == "window" and r["strip_id"] == f["strip_id"])
    # restart with resume: the remaining strips only
    r = subprocess.run(
        [sys.executable, "-m", "sarloc.cli", *args, "--resume", "--no-follow"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    all_fixes = [x for x in _records(rec) if x["type"] == "fix"]
    assert sorted(x["strip_id"] for x in all_fixes) == sorted({x["strip_id"] for x in all_fixes})
    assert len(all_fixes) == 3


def test_gnss_aiding_once_a_second_and_a_gnss_that_disagrees_is_dropped(flight, tmp_path, caplog):
    """gnss_aiding: the autopilot's own GNSS fix initialises the filter and then reaches it at most once a second;
    after five gated-out GNSS fixes in a row (2 km off the track) the GNSS is not used again in the run."""
    import logging

    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.mavlink import GnssSample

    caplog.set_level(logging.INFO, logger="sarloc.runtime.daemon")
    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, clock="unix", mavlink=True, gnss_aiding=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="gnss_aiding reads the autopilot's GNSS over MAVLink"):
        load_run_config(None, source="dir://x", export="e", pack="p", gnss_aiding=True)
    d = Daemon(cfg)
    link = d.link = _FakeLink(time.monotonic())
    x, y = (float(v) for v in d.loc.pack.centres_m().mean(axis=0))
    lon, lat = d._to_lonlat(x, y)
    lon_far, lat_far = d._to_lonlat(x + 2000.0, y)
    rx0 = time.monotonic() - 60.0
    wall0 = time.time() - 60.0
    for k in range(700):  # flying east for the last 70 s: straight, so the GNSS fixes apply
        d.nav.add_motion(wall0 - 10.0 + k / 10, "air", (20.0, 0.0))
    used = []
    for k in range(40):  # a fix every 0.25 s for 10 s: one a second reaches the filter
        link.gnss = lambda max_age_s=None, k=k: GnssSample(rx0 + 0.25 * k, 0.1, lat, lon, 0.5, "GPS_RAW_INT")
        d.nav_state(time.time())
        used.append(d.autopilot.gnss_stats["used"])
    assert used[0] == 1 and used[-1] == 10 and d.nav.stats["gnss_applied"] == 10
    assert d.nav.initialised and np.hypot(*(np.asarray(d.nav.estimate(d.nav.last_fix_s).xy_m) - (x, y))) < 5.0
    assert d.nav.estimate(d.nav.last_fix_s).sigma_h_m < 3.0  # h_acc 0.5 m, floored at GNSS_MIN_SIGMA_M
    for k in range(7):
        link.gnss = lambda max_age_s=None, k=k: GnssSample(rx0 + 11.0 + k, 0.1, lat_far, lon_far, 0.5, "GPS_RAW_INT")
        d.nav_state(time.time())
    assert d.autopilot.gnss_stats == {"used": 10, "gated": 5, "skipped": 0}  # the last two were not tried
    assert sum("disagreed with the track 5 times in a row" in r.getMessage() for r in caplog.records) == 1
    d.rec.close()
    events = [r.get("event") for r in read_records(tmp_path / "run" / "records.jsonl") if r["type"] == "nav"]
    assert "gnss aiding" in events and "gnss off" in events


def test_config_errors(tmp_path):
    from sarloc.cli import main
    from sarloc.runtime.daemon import load_run_config

    bad = tmp_path / "bad.toml"
    bad.write_text("source = 'dir://x'\nexport = 'e'\npack = 'p'\nstrid_px = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key.*strid_px"):
        load_run_config(bad)
    bad.write_text("source = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="'pack' is required"):
        load_run_config(None, source="dir://x", export="e")
    for v in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="flow_correction_s"):
            load_run_config(None, source="dir://x", export="e", pack="p", flow_correction_s=v)
    bad.write_text("source = 'dir://x'\nexport = 'e'\npack = 'p'\n[mavlink]\ngps_rate_hz = -1\n")
    with pytest.raises(ConfigError):
        load_run_config(bad)
    assert main(["run", "--config", str(bad)]) == 1
    assert main(["run", "--source", "dir://x", "--export", str(tmp_path), "--pack", str(tmp_path)]) == 1


def test_compare_fixes_handles_any_json_values():
    """Regression (exploring fuzz run): an integer beyond the float range raised OverflowError in compare_fixes."""
    from sarloc.eval.replay import compare_fixes

    rec = {"type": "fix", "strip_id": "s", "t_s": 10**400, "xy_m": [float("nan"), ["a"]], "confidence": 0.5}
    assert compare_fixes([rec], [rec]) == []
    diffs = compare_fixes([rec], [{**rec, "t_s": 1.0, "confidence": 0.5 + 1e-9}])
    assert len(diffs) == 1 and diffs[0].startswith("strip 's': t_s 1000") and diffs[0].endswith("!= 1.0")


def test_sigterm_while_waiting_for_strips_is_prompt_and_ends_with_a_no_fix(flight, tmp_path):
    """Follow mode with every strip processed: SIGTERM stops at once (not at the next strip), and the last
    GPS_INPUT the autopilot gets is a no-fix."""
    from pymavlink import mavutil

    port = _free_udp_port()
    rx = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=255, dialect="common")
    out = tmp_path / "run"
    args = run_args(flight, out, "--mavlink", f"udpout:127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarloc.cli", *args], env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rec = out / "records.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (rec.is_file() and rec.read_text().count('"type":"fix"') == 3):
        time.sleep(0.1)
    gps = []
    t_wait = time.time() + 2.0
    while time.time() < t_wait:  # the daemon is now waiting for a fourth strip, sending positions meanwhile
        m = rx.recv_match(type="GPS_INPUT", blocking=True, timeout=0.2)
        if m is not None:
            gps.append(m)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    stop_s = time.time() - t0
    while (m := rx.recv_match(type="GPS_INPUT", blocking=True, timeout=0.5)) is not None:
        gps.append(m)
    rx.close()
    assert proc.returncode == 0, err[-3000:]
    assert stop_s < 5.0, stop_s
    assert len(gps) >= 10  # about 10 Hz while waiting
    assert gps[-1].fix_type == 1 and gps[-1].lat == 0  # the last word is a no-fix
    recs = _records(rec)
    assert recs[-1]["type"] == "stop" and recs[-1]["stats"]["mavlink"]["nofix_sent"] >= 1


def test_clock_map_modes():
    from sarloc.runtime.daemon import ClockMap

    c = ClockMap("auto")
    assert c.now(1000.0) is None  # nothing known yet
    c.observe_data(1_700_000_000.0, wall_s=1_800_000_000.0)  # recorded data: years old
    assert c.mode == "data"
    assert c.now(1_800_000_005.0) == pytest.approx(1_700_000_005.0)
    c.observe_data(1_700_000_100.0, wall_s=1_800_000_006.0)  # a replay runs faster than real time
    assert c.now(1_800_000_006.0) == pytest.approx(1_700_000_100.0)
    assert c.now(1_800_000_000.0) == pytest.approx(1_700_000_100.0)  # never backwards
    u = ClockMap("auto")
    u.observe_data(1000.0, wall_s=1010.0)
    assert u.mode == "unix" and u.now(2000.0) == 2000.0
    a = ClockMap("autopilot")
    for k in range(5):  # a simulator at 4x real time, 100 s ahead
        a.observe_autopilot(wall_s=1000.0 + k, unix_s=1100.0 + 4.0 * k)
    assert a.now(1010.0) == pytest.approx(1100.0 + 40.0, abs=1e-6)


def test_fix_from_the_future_is_refused(flight, tmp_path):
    """Strips stamped an hour ahead of this computer's clock (clock = unix): no position is backed by them."""
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.sources import open_source

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, clock="unix",
    )  # fmt: skip
    d = Daemon(cfg)
    ahead = time.time() + 3600.0 - 1_700_000_000.0  # the simulated strips start at 1.7e9

    def shifted():
        import dataclasses

        for b in open_source(cfg.source, follow=False):
            yield dataclasses.replace(b, meta=dataclasses.replace(b.meta, t0_s=b.meta.t0_s + ahead))

    stats = d.run(shifted())
    assert stats["nav"]["fixes_future"] > 0 and stats["windows_applied"] == 0
    assert not d.nav.initialised
    assert not d.nav_state(time.time()).valid


class _FakeLink:
    """What the daemon reads from a MavlinkLink, fixed: a plane flying east at 20 m/s equivalent airspeed."""

    def __init__(self, mono: float) -> None:
        from sarloc.runtime.mavlink import AttitudeSample, AutopilotPosition, SpeedSample, WindSample

        self.pos = AutopilotPosition(mono, 0, 46.0, 1.7, 1150.0, 150.0, (0.0, 20.0, -1.5), 90.0)
        self.att = AttitudeSample(mono, 90.0)
        self.asp = SpeedSample(20.0, mono)
        self.wnd = WindSample(mono, 0.0, 3.0)
        self.fix = None  # the autopilot's own GNSS
        self.flow = None  # its OPTICAL_FLOW

    def gnss(self, max_age_s=None):
        return self.fix

    def optical_flow(self, max_age_s=None):
        return self.flow

    def position_prior(self, max_age_s=None):
        return self.pos

    def attitude(self, max_age_s=None):
        return self.att

    def airspeed_mps(self, max_age_s=None):
        return self.asp

    def wind(self, max_age_s=None):
        return self.wnd

    def autopilot_clock(self):
        return None

    def heading_deg(self, max_age_s=None):
        return 90.0


def test_nav_state_fields_for_the_autopilot(flight, tmp_path):
    """Altitude = field elevation + the autopilot's height above home; no yaw (no independent heading); accuracies
    from the filter; the airspeed input is converted to true airspeed; invalid before the first position."""
    from sarloc.runtime.daemon import Daemon, eas_to_tas, load_run_config

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, field_elevation_m=1000.0, clock="unix",
    )  # fmt: skip
    d = Daemon(cfg)
    now = time.time()
    assert not d.nav_state(now).valid  # no position yet: no-fix
    d.link = _FakeLink(time.monotonic())
    d.clock.observe_data(now, now)
    d.nav_state(now)  # one motion input: the air velocity
    u = d.nav._after[-1].u
    tas = 20.0 * eas_to_tas(1150.0)
    assert u.kind == "air" and u.v[0] == pytest.approx(math.sqrt(tas**2 - 1.5**2), rel=1e-3)  # east, true airspeed
    link = _FakeLink(time.monotonic())  # climbing at 10 m/s: the air velocity's horizontal part moves the filter
    link.pos = dataclasses.replace(link.pos, rx_mono_s=time.monotonic(), vel_ned_mps=(0.0, 20.0, -10.0))
    link.att = link.att._replace(rx_mono_s=time.monotonic())
    d.link = link
    d.nav_state(time.time())
    assert d.nav._after[-1].u.v[0] == pytest.approx(math.sqrt(tas**2 - 10.0**2), rel=1e-3)
    d.link = _FakeLink(time.monotonic())
    d.nav_state(time.time())
    x, y = (float(v) for v in d.loc.pack.centres_m().mean(axis=0))
    changed, _ = d.nav.add_consensus(now, (x, y), 10.0, now, d._wind_prior())
    assert changed and d.nav.estimate(now).bias_mps[1] == pytest.approx(3.0, abs=0.2)  # the autopilot's wind
    st = d.nav_state(now + 0.1)
    assert st.valid and st.yaw_deg is None
    assert st.alt_m == pytest.approx(1150.0) and st.vert_accuracy_m is not None
    assert st.horiz_accuracy_m == pytest.approx(d.nav.estimate(now + 0.1).sigma_h_m, rel=0.05)
    assert st.vel_ned_mps[1] > 15.0 and st.vel_ned_mps[2] == pytest.approx(-1.5)  # east; the autopilot's climb


def _dcm(roll_deg: float, pitch_deg: float, yaw_deg: float) -> np.ndarray:
    """Body -> NED rotation (yaw, pitch, roll)."""
    r, p, y = np.radians([roll_deg, pitch_deg, yaw_deg])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    return rz @ ry @ rx


@pytest.mark.parametrize("att", [(0.0, 0.0, 0.0), (0.0, 0.0, 90.0), (8.0, -12.0, 230.0), (-15.0, 5.0, 10.0)])
def test_optical_flow_gives_the_ground_velocity(att):
    """Flow rates made the way EKF3 predicts them (body-frame velocity over the range along the sensor's axis) give
    back the NED velocity they were made from, tilted or not, climbing or not."""
    from sarloc.runtime.autopilot_io import flow_velocity_ne

    height = 30.0
    for v_ned in ([10.0, 0.0, 0.0], [-3.0, 7.0, 0.0], [4.0, -6.0, -1.5]):
        vb = _dcm(*att).T @ np.array(v_ned)
        rng = height / (math.cos(math.radians(att[0])) * math.cos(math.radians(att[1])))
        comp_x, comp_y = -vb[1] / rng, vb[0] / rng
        n, e = flow_velocity_ne(comp_x, comp_y, height, *att, vd_mps=v_ned[2])
        assert (n, e) == (pytest.approx(v_ned[0], abs=1e-9), pytest.approx(v_ned[1], abs=1e-9))


def test_the_flow_motion_input_is_the_last_second_s_mean(flight, tmp_path):
    """``motion = "flow"``: the filter's input is the mean of the optical flow's last second (single samples are
    noisy), a ground velocity independent of the positions sent; none without a fresh flow."""
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.mavlink import FlowSample

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, clock="unix", motion="flow",
    )  # fmt: skip
    d = Daemon(cfg)
    link = _FakeLink(time.monotonic())
    link.att = link.att._replace(yaw_deg=0.0)  # facing north, level
    link.pos = dataclasses.replace(link.pos, vel_ned_mps=(0.0, 0.0, 0.0))
    link.optical_flow = lambda max_age_s=None: link.flow
    d.link = link
    now = time.time()
    d.clock.observe_data(now, now)
    mono = time.monotonic()
    link.flow = None
    d.nav_state(now)
    assert not d.nav._after  # no flow: no input
    for k, comp_y in enumerate((0.3, 0.4, 0.2)):  # 9, 12, 6 m/s north at 30 m
        link.flow = FlowSample(mono + 0.1 * k, 0.0, comp_y, 30.0, 255)
        d.nav_state(now)
    u = d.nav._after[-1].u
    grid = math.radians(d.autopilot.grid_from_true_deg)
    assert u.kind == "ground" and float(np.hypot(*u.v)) == pytest.approx(9.0)
    assert u.v[1] == pytest.approx(9.0 * math.cos(grid), abs=1e-6)
    link.flow = FlowSample(mono + 1.15, 0.0, 0.5, 30.0, 255)  # the first two are more than a second older
    d.nav_state(now)
    assert float(np.hypot(*d.nav._after[-1].u.v)) == pytest.approx((6.0 + 15.0) / 2)


@pytest.mark.parametrize("tau", [8.0, 0.0])
def test_the_autopilot_s_velocity_is_corrected_by_the_flow_s_slow_part(flight, tmp_path, tau, monkeypatch):
    """``motion = "velocity"`` with ``flow_correction_s``: the autopilot's velocity (pulled by the positions sent
    without GNSS) plus the flow's exponential mean difference from it: a steady 1 m/s across the track that the
    velocity lacks is learnt over a few time constants, a single noisy flow sample moves the input by a fraction
    only, and a flow that stops leaves the autopilot's velocity as it is; 0: off."""
    import types

    from sarloc.runtime import autopilot_io
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.mavlink import FlowSample

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, clock="unix", motion="velocity", flow_correction_s=tau,
    )  # fmt: skip
    mono = [1000.0]  # the daemon's monotonic clock, stepped with the samples
    monkeypatch.setattr(autopilot_io, "time", types.SimpleNamespace(monotonic=lambda: mono[0], time=time.time))
    d = Daemon(cfg)
    link = d.link = _FakeLink(time.monotonic())
    link.att = link.att._replace(yaw_deg=0.0)  # facing north, level
    now = time.time()
    d.clock.observe_data(now, now)
    g = math.radians(d.autopilot.grid_from_true_deg)

    def step(t_mono: float, flow_east: float) -> np.ndarray:
        mono[0] = t_mono
        link.pos = dataclasses.replace(link.pos, rx_mono_s=t_mono, vel_ned_mps=(10.0, 0.0, 0.0))  # north, 10 m/s
        link.att = link.att._replace(rx_mono_s=t_mono)
        comp_x = -flow_east / 30.0  # body y (east when facing north) at 30 m: the flow sees 1 m/s more east
        link.flow = FlowSample(t_mono, comp_x, 10.0 / 30.0, 30.0, 255)
        d.nav_state(now)
        u = d.nav._after[-1].u.v  # grid -> true north
        return np.array([u[0] * math.cos(g) - u[1] * math.sin(g), u[0] * math.sin(g) + u[1] * math.cos(g)])

    t0 = mono[0]
    u = step(t0, 1.0)
    assert u == pytest.approx([0.0, 10.0], abs=0.02)  # the first sample barely moves it
    for k in range(1, 401):  # 40 s at 10 Hz: five time constants
        u = step(t0 + 0.1 * k, 1.0)
    if tau == 0:
        assert u == pytest.approx([0.0, 10.0], abs=1e-6) and d.autopilot.flow_stats["corrected"] == 0
        return
    assert u == pytest.approx([1.0 - math.exp(-40.0 / tau), 10.0], abs=0.02)
    assert step(t0 + 40.1, 6.0)[0] == pytest.approx(1.0 + 5.0 * (1.0 - math.exp(-0.1 / tau)), abs=0.02)
    link.flow = None  # the flow stops: after FLOW_CORRECTION_STALE_S the velocity is the autopilot's again
    mono[0] = t0 + 40.1 + autopilot_io.FLOW_CORRECTION_STALE_S + 0.1
    link.pos = dataclasses.replace(link.pos, rx_mono_s=mono[0])
    d.nav_state(now)
    assert float(d.nav._after[-1].u.v @ d.nav._after[-1].u.v) == pytest.approx(100.0, abs=1e-6)


def test_the_strip_s_course_is_measured_once_at_its_start(flight, tmp_path):
    """``[nav] course_sigma_deg``: the strip's heading is the course at its first row (its pixels are laid out across
    it; a copter's course wanders from it along the strip), so each strip gives one course measurement, at its
    ``t0_s``, however many blocks it arrives in; a strip seen before the filter has a position is measured later."""
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.navfilter import NavConfig
    from sarloc.runtime.types import Strip, StripMeta

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, clock="unix", motion="velocity",
    )  # fmt: skip
    d = Daemon(dataclasses.replace(cfg, nav=NavConfig(course_sigma_deg=1.0)))
    link = d.link = _FakeLink(time.monotonic())  # flying east at 20 m/s
    now, mono = time.time(), time.monotonic()
    d.clock.observe_data(now, now)

    def blocks(sid: str, t0: float, n: int) -> list[Strip]:
        meta = StripMeta(sid, 10.0, 90.0 + d.autopilot.grid_from_true_deg, t0, 2.0)
        return [Strip(meta, np.zeros((16, 8), np.float32), 16 * k, k == n - 1) for k in range(n)]

    for k in range(60):  # 6 s of the autopilot's velocity at 10 Hz
        link.pos = dataclasses.replace(link.pos, rx_mono_s=mono - 6.0 + 0.1 * k)
        d.nav_state(now - 6.0 + 0.1 * k)
    early = blocks("a", now - 5.5, 3)
    d._strip_course(early[0])  # no position yet: not decided
    assert d.nav.stats["courses_applied"] == 0
    assert d.nav.add_consensus(now - 5.8, (500.0, 500.0), 20.0, now_s=now)[0]
    for b in early[1:] + blocks("b", now - 2.5, 4):
        d._strip_course(b)
    assert d.nav.stats["courses_applied"] == 2
    assert sorted(e.t_s for e in d.nav._events if e.kind == "course") == [now - 5.5, now - 2.5]


def test_the_air_input_leads_the_yaw_by_the_turn_slip(flight, tmp_path):
    """``[nav] turn_slip_s``: in a turn the air-velocity input's heading is the yaw led by the heading rate (from
    consecutive ATTITUDEs) times it; without a turn, or unset, the yaw itself."""
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.navfilter import NavConfig

    def heading_after(slip_s: float, yaws: tuple[float, ...]) -> float:
        cfg = load_run_config(
            None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
            out=str(tmp_path / f"run{slip_s}{len(yaws)}"), follow=False, clock="unix",
        )  # fmt: skip
        d = Daemon(dataclasses.replace(cfg, nav=NavConfig(turn_slip_s=slip_s)))
        link = _FakeLink(time.monotonic())
        d.link = link
        now = time.time()
        d.clock.observe_data(now, now)
        mono = time.monotonic()
        for k, yaw in enumerate(yaws):  # ATTITUDE at 10 Hz
            link.att = link.att._replace(rx_mono_s=mono + 0.1 * k, yaw_deg=yaw)
            link.asp = link.asp._replace(rx_mono_s=mono + 0.1 * k)
            d.nav_state(now)
        u = d.nav._after[-1].u.v
        return math.degrees(math.atan2(u[0], u[1])) - d.autopilot.grid_from_true_deg

    assert heading_after(0.15, (90.0, 91.6, 93.2)) == pytest.approx(93.2 + 16.0 * 0.15, abs=1e-6)  # 16 deg/s
    assert heading_after(0.15, (90.0, 90.0, 90.0)) == pytest.approx(90.0, abs=1e-6)
    assert heading_after(0.0, (90.0, 91.6, 93.2)) == pytest.approx(93.2, abs=1e-6)


def test_the_turn_slip_is_the_mean_of_the_turns_and_saturates():
    """:class:`TurnSlip`: only turning samples count, each in its turn's direction; nothing is led until enough
    were seen; the whole slip from SLIP_TURN_RATE on, in proportion below; a sample beyond SLIP_MAX_DEG is left out."""
    from sarloc.runtime.autopilot_io import SLIP_MAX_DEG, SLIP_MIN_SAMPLES, SLIP_TURN_RATE, TurnSlip

    ts = TurnSlip()
    for _ in range(5 * SLIP_MIN_SAMPLES):
        ts.observe(0.01, math.radians(8.0))  # straight flight: a crab, not a slip
    assert not ts.learnt and ts.lead_rad(0.3) == 0.0
    for k in range(SLIP_MIN_SAMPLES):
        ts.observe(0.35 if k % 2 else -0.25, math.radians(3.0 if k % 2 else -3.0))
        ts.observe(0.3, math.radians(SLIP_MAX_DEG + 5.0))
        assert ts.learnt == (k == SLIP_MIN_SAMPLES - 1)
    assert math.degrees(ts.lead_rad(0.35)) == pytest.approx(3.0)
    assert math.degrees(ts.lead_rad(-0.25)) == pytest.approx(-3.0)
    assert math.degrees(ts.lead_rad(SLIP_TURN_RATE / 2)) == pytest.approx(1.5)


def test_the_slip_is_learnt_while_the_autopilot_has_its_gnss_and_leads_the_air_input(flight, tmp_path):
    """``[nav] learn_turn_slip``: in turns on the autopilot's own GNSS, its course through the air (ground velocity
    less wind) leads its yaw; once learnt, the air input's heading leads the yaw by that angle in turns. Without the
    GNSS (its velocity is then built from the positions sent) nothing is learnt; ``turn_slip_s`` takes precedence."""
    from sarloc.runtime.autopilot_io import SLIP_MIN_SAMPLES
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.mavlink import GnssSample
    from sarloc.runtime.navfilter import NavConfig

    def fly(nav: NavConfig, gnss: bool, name: str) -> tuple[Daemon, float]:
        cfg = load_run_config(
            None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
            out=str(tmp_path / name), follow=False, clock="unix",
        )  # fmt: skip
        d = Daemon(dataclasses.replace(cfg, nav=nav))
        link = d.link = _FakeLink(time.monotonic())
        link.wnd = link.wnd._replace(east_mps=2.0, north_mps=-1.0)
        now = time.time()
        d.clock.observe_data(now, now)
        mono = time.monotonic()
        for k in range(SLIP_MIN_SAMPLES + 20):  # turning right at 20 deg/s, 10 Hz, the course 3 deg ahead
            t, yaw = mono + 0.1 * k, 20.0 * 0.1 * k
            course = math.radians(yaw + 3.0 + 20.0 * 0.05)  # the position arrives 50 ms after the attitude
            link.att = link.att._replace(rx_mono_s=t, yaw_deg=yaw % 360.0)
            link.asp = link.asp._replace(rx_mono_s=t)
            vel = (25.0 * math.cos(course) - 1.0, 25.0 * math.sin(course) + 2.0, 0.0)  # ground = air + wind
            link.pos = dataclasses.replace(link.pos, rx_mono_s=t + 0.05, vel_ned_mps=vel)
            link.fix = GnssSample(t, 0.0, 46.0, 1.7, 1.0, "GPS2_RAW") if gnss else None
            d.nav_state(now)
        u = d.nav._after[-1].u.v
        return d, (math.degrees(math.atan2(u[0], u[1])) - d.autopilot.grid_from_true_deg - yaw + 180.0) % 360.0 - 180.0

    d, lead = fly(NavConfig(), True, "learn")
    assert d.autopilot.turn_slip.learnt and lead == pytest.approx(3.0, abs=0.05)
    d, lead = fly(NavConfig(), False, "denied")
    assert d.autopilot.turn_slip.n == 0 and lead == pytest.approx(0.0, abs=1e-6)
    assert fly(NavConfig(learn_turn_slip=False), True, "off")[1] == pytest.approx(0.0, abs=1e-6)
    assert fly(NavConfig(turn_slip_s=0.1), True, "fixed")[1] == pytest.approx(2.0, abs=1e-6)


def test_the_autopilot_s_velocity_is_measured_while_its_gnss_has_a_fix(flight, tmp_path):
    """``[nav] gnss_velocity_sigma_mps``: the autopilot's ground velocity reaches the filter about once a second
    while its own GNSS has a fix, never without it (it is then built from the positions sent), never when it is the
    motion input itself (``motion = "velocity"``), and not when unset; in level flight under way only (not on the
    ground, not in a climb); before the filter's first position it is kept for the filter's start."""
    from sarloc.runtime.daemon import Daemon, load_run_config
    from sarloc.runtime.mavlink import GnssSample
    from sarloc.runtime.navfilter import NavConfig

    def stats(sigma: float, gnss: bool, motion: str = "airspeed", vel=(0.0, 20.0, -1.5), init=True) -> dict:
        cfg = load_run_config(
            None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
            out=str(tmp_path / f"run{sigma}{gnss}{motion}{vel}{init}"), follow=False, clock="unix", motion=motion,
        )  # fmt: skip
        d = Daemon(dataclasses.replace(cfg, nav=NavConfig(gnss_velocity_sigma_mps=sigma)))
        link = d.link = _FakeLink(time.monotonic())
        now, mono = time.time(), time.monotonic()
        d.clock.observe_data(now, now)
        d.nav_state(now)  # the first motion input
        if init:
            assert d.nav.add_consensus(now, (500.0, 500.0), 20.0, now_s=now)[0]
        for k in range(1, 31):  # 3 s at 10 Hz
            link.att = link.att._replace(rx_mono_s=mono + 0.1 * k)
            link.asp = link.asp._replace(rx_mono_s=mono + 0.1 * k)
            link.pos = dataclasses.replace(link.pos, rx_mono_s=mono + 0.1 * k, vel_ned_mps=vel)
            link.fix = GnssSample(mono + 0.1 * k, 0.0, 46.0, 1.7, 1.0, "GPS2_RAW") if gnss else None
            d.nav_state(now + 0.1 * k)
        return dict(d.autopilot.velocity_stats, **{k: v for k, v in d.nav.stats.items() if k.startswith("veloc")})

    assert stats(0.5, True)["used"] == 3
    assert stats(0.5, False)["used"] == stats(0.0, True)["used"] == stats(0.5, True, "velocity")["used"] == 0
    assert stats(0.5, True, vel=(0.0, 0.0, 0.0))["not_level"] == 3  # on the ground
    assert stats(0.5, True, vel=(0.0, 20.0, -8.0))["not_level"] == 3  # climbing
    s = stats(0.5, True, init=False)
    assert s["used"] == s["velocities_kept"] == 3 and s["velocities_applied"] == 0


def test_run_restores_the_signal_handlers(flight, tmp_path):
    from sarloc.runtime.daemon import load_run_config, run

    cfg = load_run_config(
        None, source=f"dir://{flight / 'strips'}", export=str(MODEL_DIR), pack=str(flight / "pack"),
        out=str(tmp_path / "run"), follow=False, max_strips=1,
    )  # fmt: skip
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run(cfg)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_mavlink_port_that_never_opens_exits_1_after_the_run(flight, tmp_path, capsys):
    """A busy port (another program holds it): the daemon keeps localising, records its fixes, and then exits 1
    saying that nothing reached the autopilot, instead of 0 as if the flight had been served."""
    from sarloc.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        out = tmp_path / "run"
        rc = main(run_args(flight, out, "--no-follow", "--mavlink", f"udpin:127.0.0.1:{port}"))
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sarloc run: error: MAVLink: nothing reached the autopilot") and str(port) in err
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert any(r["type"] == "fix" for r in recs) and recs[-1]["type"] == "stop"
