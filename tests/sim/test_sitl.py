"""The ArduPilot SITL harness against a real ArduCopter SITL (skipped when the binaries are absent)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from sarloc.core.errors import SarlocError
from sarloc.sim.sitl import (
    SITL_DIR_ENV,
    Sitl,
    SitlConfig,
    TelemetryRecorder,
    TruthSample,
    Vehicle,
    find_sitl,
)

HOME = (-35.363261, 149.165230, 584.0, 353.0)
INSTANCE = 7  # ports 5830/5832/5833: distinct from the usual 0..5 of other runs
SPEEDUP = 10  # one copter instance keeps up at 10x on 2 cores


def _sitl_dir() -> Path:
    d = find_sitl()
    if d is None:
        pytest.skip(f"ArduPilot SITL not found at ${SITL_DIR_ENV} or ../shared/sitl: binaries or .parm files missing")
    return d


@pytest.fixture(scope="module")
def copter(tmp_path_factory):
    """A running copter SITL with a ground station on SERIAL0 and a recorder on SERIAL2."""
    sitl_dir = _sitl_dir()
    work = tmp_path_factory.mktemp("sitl")
    cfg = SitlConfig("copter", INSTANCE, HOME, SPEEDUP, {"GPS2_TYPE": 14}, sitl_dir)
    with Sitl(cfg, workdir=work) as sitl, Vehicle(sitl.gcs_url) as vehicle:
        truths: list[TruthSample] = []
        with TelemetryRecorder(sitl.serial2_url, work / "telemetry.jsonl") as rec:
            rec.on_truth(truths.append)
            yield sitl, vehicle, rec, truths


def test_find_sitl_absent(tmp_path, monkeypatch):
    assert find_sitl(tmp_path) is None
    monkeypatch.setenv(SITL_DIR_ENV, str(tmp_path))
    assert find_sitl() is None


def test_unknown_vehicle():
    with pytest.raises(SarlocError, match="unknown SITL vehicle"):
        Sitl(SitlConfig(vehicle="boat"))


def test_ports_and_urls(tmp_path):
    sitl = Sitl(SitlConfig(instance=3), workdir=tmp_path)
    assert (sitl.gcs_url, sitl.serial1_url, sitl.serial2_url) == (
        "tcp:127.0.0.1:5790",
        "tcp:127.0.0.1:5792",
        "tcp:127.0.0.1:5793",
    )


def test_params_set_and_read_back(copter):
    _, vehicle, _, _ = copter
    assert vehicle.get_param("GPS2_TYPE") == 14  # from SitlConfig.params, loaded at boot
    vehicle.set_params({"EK3_CHECK_SCALE": 150, "GPS2_DELAY_MS": 150, "SIM_GPS1_NUMSATS": 12.0})
    assert vehicle.get_param("EK3_CHECK_SCALE") == pytest.approx(150)
    assert vehicle.get_param("SIM_GPS1_NUMSATS") == pytest.approx(12)
    assert vehicle.get_param("NO_SUCH_PARAM") is None
    with pytest.raises(SarlocError, match="NO_SUCH_PARAM"):
        vehicle.set_params({"NO_SUCH_PARAM": 1})


def test_mission_upload_and_read_back(copter):
    _, vehicle, _, _ = copter
    wps = [(HOME[0] + 0.001, HOME[1], 30.0), (HOME[0] + 0.001, HOME[1] + 0.001, 40.0)]
    sent = vehicle.upload_mission(wps, takeoff_alt_m=25)
    back = vehicle.download_mission()
    assert [it.command for it in back] == [16, 22, 16, 16, 20]  # home, TAKEOFF, WP, WP, RTL
    assert len(back) == len(sent)
    assert back[1].alt_m == pytest.approx(25)
    for s, b in zip(sent[2:4], back[2:4], strict=True):
        assert (b.lat_deg, b.lon_deg, b.alt_m) == pytest.approx((s.lat_deg, s.lon_deg, s.alt_m), abs=1e-6)


def test_truth_records_arrive(copter):
    _, vehicle, rec, truths = copter
    vehicle.wait_ekf_ready(60)
    deadline = time.monotonic() + 10
    while len(truths) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(truths) >= 20, f"only {len(truths)} truth samples in 10 s"
    t = truths[-1]
    north_m = (t.lat_deg - HOME[0]) * 111_320
    east_m = (t.lon_deg - HOME[1]) * 111_320 * math.cos(math.radians(HOME[0]))
    assert math.hypot(north_m, east_m) < 1.0 and abs(t.alt_m - HOME[2]) < 1.0
    types = {json.loads(line)["type"] for line in rec.path.read_text().splitlines()}
    assert {"truth", "SIM_STATE", "GLOBAL_POSITION_INT", "EKF_STATUS_REPORT", "HEARTBEAT"} <= types
    assert any("EKF3" in text for _, _, text in vehicle.statustexts) or "STATUSTEXT" in types


def test_vehicle_decodes_ardupilot_messages_whatever_dialect_the_process_set():
    """Regression: a `dialect="common"` connection elsewhere in the process switched pymavlink's global dialect, and
    the harness's links then dropped EKF_STATUS_REPORT (ardupilotmega only): "EKF not ready" in the full suite."""
    import socket
    import threading

    from pymavlink import mavutil

    from sarloc.sim.sitl import Vehicle

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ap = mavutil.mavlink_connection(
        f"udpout:127.0.0.1:{port}", source_system=1, source_component=1, dialect="ardupilotmega"
    )
    mavutil.set_dialect("common")
    stop = threading.Event()

    def autopilot() -> None:
        while not stop.wait(0.05):
            ap.mav.heartbeat_send(2, 3, 0, 0, 0)
            ap.mav.ekf_status_report_send(0x33F, 0.1, 0.1, 0.1, 0.1, 0.1)

    t = threading.Thread(target=autopilot, daemon=True)
    t.start()
    try:
        v = Vehicle(f"udpin:127.0.0.1:{port}", timeout_s=10)
        msg = v.recv(["EKF_STATUS_REPORT"], 5.0)
        v.close()
    finally:
        stop.set()
        t.join()
        ap.close()
    assert msg is not None and msg.flags == 0x33F
