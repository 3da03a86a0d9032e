"""The closed loop's set-up, without a simulator: the autopilot parameters and the daemon's motion per vehicle."""

from __future__ import annotations

import pytest
import tomllib

from sarloc.sim.closed_loop import (
    FLOW_NAV,
    FLOW_PARAMS,
    MAX_TURN_DEG,
    ClosedLoopConfig,
    _autopilot_params,
    _daemon_config,
)


def _cfg(tmp_path, **kw) -> ClosedLoopConfig:
    return ClosedLoopConfig(scene=str(tmp_path / "scene"), out=str(tmp_path / "out"), **kw)


def _motion(cfg: ClosedLoopConfig, tmp_path) -> str:
    toml = _daemon_config(cfg, tmp_path / "export", tmp_path / "pack", tmp_path, 14550, "tcp:127.0.0.1:5762")
    return tomllib.loads(toml.read_text())["motion"]


@pytest.mark.parametrize(
    ("vehicle", "flow", "motion"),
    [("plane", False, "airspeed"), ("copter", False, "strip"), ("copter", True, "velocity")],
)
def test_motion_input_follows_the_vehicle_and_its_sensors(tmp_path, vehicle, flow, motion):
    assert _motion(_cfg(tmp_path, vehicle=vehicle, flow=flow), tmp_path) == motion


def test_flow_makes_optical_flow_the_only_horizontal_velocity_source(tmp_path):
    with_flow = _autopilot_params(_cfg(tmp_path, vehicle="copter", flow=True))
    without = _autopilot_params(_cfg(tmp_path, vehicle="copter"))
    assert with_flow["EK3_SRC1_VELXY"] == 5 and with_flow["EK3_SRC_OPTIONS"] == 0
    assert with_flow["FLOW_TYPE"] == 10 and with_flow["RNGFND1_TYPE"] == 100
    assert with_flow["EK3_MAG_M_NSE"] == 0.02  # the yaw without GNSS rests on the compass
    assert not set(FLOW_PARAMS) & set(without)
    assert with_flow["GPS2_TYPE"] == 14  # sarloc stays GPS2


def test_extra_params_override_and_turn_limit_defaults(tmp_path):
    cfg = _cfg(tmp_path, vehicle="copter", flow=True, extra_params={"EK3_FLOW_M_NSE": 0.1})
    assert _autopilot_params(cfg)["EK3_FLOW_M_NSE"] == 0.1
    assert MAX_TURN_DEG["copter"] > MAX_TURN_DEG["plane"]


def test_nav_settings_reach_the_daemon_config(tmp_path):
    cfg = _cfg(tmp_path, nav={"course_sigma_deg": 2.0})
    toml = _daemon_config(cfg, tmp_path / "export", tmp_path / "pack", tmp_path, 14550, "tcp:127.0.0.1:5762")
    assert tomllib.loads(toml.read_text())["nav"] == {"course_sigma_deg": 2.0}


def _nav(cfg: ClosedLoopConfig, tmp_path) -> dict:
    toml = _daemon_config(cfg, tmp_path / "export", tmp_path / "pack", tmp_path, 14550, "tcp:127.0.0.1:5762")
    return tomllib.loads(toml.read_text()).get("nav", {})


def test_the_copter_with_flow_turns_its_heading_uncertainty_down(tmp_path):
    """With optical flow (its autopilot's velocity as the input) the copter's ``[nav]`` has the smaller heading
    growth per turn that goes with EKF3's compass trust; settings given override it; other set-ups have none."""
    assert _nav(_cfg(tmp_path, vehicle="copter", flow=True), tmp_path) == FLOW_NAV
    assert FLOW_NAV["heading_turn_fraction"] < 0.03  # below the filter's default
    over = _nav(_cfg(tmp_path, vehicle="copter", flow=True, nav={"heading_turn_fraction": 0.02}), tmp_path)
    assert over == {"heading_turn_fraction": 0.02}
    assert _nav(_cfg(tmp_path, vehicle="copter", flow=True, motion="flow"), tmp_path) == {}
    assert _nav(_cfg(tmp_path, vehicle="plane"), tmp_path) == {}


def test_sent_sigma_consistency_counts_errors_in_units_of_the_stated_sigma():
    import numpy as np

    from sarloc.sim.closed_loop_analysis import _daemon_results

    truth = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]])  # (t, east, north): standing still at the origin
    errs = [5.0, 15.0, 25.0, 35.0]  # with a one-sigma of 10 m: 0.5, 1.5, 2.5 and 3.5 sigma
    navr = [{"type": "nav", "valid": True, "wall_s": 10.0 + i, "xy_m": [e, 0.0], "sigma_h_m": 10.0}
            for i, e in enumerate(errs)]  # fmt: skip
    navr.append({"type": "nav", "valid": True, "wall_s": 1.0, "xy_m": [500.0, 0.0], "sigma_h_m": 10.0})  # pre-denial
    res = _daemon_results(navr, truth, t_deny=5.0, gsd=10.0)
    c = res["sent_sigma_consistency"]
    assert (c["within_1_sigma"], c["within_2_sigma"], c["within_3_sigma"]) == (0.25, 0.5, 0.75)
    assert c["error_over_sigma_median"] == 2.0 and res["sent_position_error_m"]["median"] == 20.0


def test_sent_velocity_and_gps_glitching_are_read_against_the_truth():
    import pytest

    from sarloc.sim.closed_loop_analysis import EKF_GPS_GLITCHING, _autopilot_events, _sent_velocity

    truth = [{"type": "truth", "wall_s": t, "vn_mps": 10.0, "ve_mps": 0.0} for t in (0.0, 100.0)]  # north, 10 m/s

    def g2(t, vel_cms, cog_cdeg, acc_mms):
        return {"type": "GPS2_RAW", "wall_s": t, "fix_type": 3, "vel": vel_cms, "cog": cog_cdeg, "vel_acc": acc_mms}

    # exact; 1 m/s slow (north error -1, within 1.5); 1 m/s too fast (north error +1, outside 0.5); no fix: skipped
    sent = [
        g2(10.0, 1000, 0, 500),
        g2(11.0, 900, 0, 1500),
        g2(12.0, 1100, 0, 500),
        {**g2(13.0, 0, 0, 0), "fix_type": 1},
    ]
    v = _sent_velocity(sent, truth)
    assert v["error_per_axis_rms_mps"] == pytest.approx((2 / 6) ** 0.5, abs=1e-6)
    assert v["within_speed_accuracy"] == pytest.approx(5 / 6)
    assert v["speed_accuracy_median_mps"] == pytest.approx(0.5)
    assert _sent_velocity([], truth) is None

    flags = [0, EKF_GPS_GLITCHING, EKF_GPS_GLITCHING, 0, EKF_GPS_GLITCHING, EKF_GPS_GLITCHING]
    tel = [{"type": "EKF_STATUS_REPORT", "wall_s": 20.0 + i, "flags": f | 0x10} for i, f in enumerate(flags)]
    tel.insert(0, {"type": "EKF_STATUS_REPORT", "wall_s": 5.0, "flags": EKF_GPS_GLITCHING})  # before the denial
    res, _ = _autopilot_events({"statustexts": []}, tel, t_deny=10.0, t_end=24.5)  # the last one is after RTL
    assert res["ekf_gps_glitching"] == {"fraction": pytest.approx(3 / 5), "onsets": 2}
    assert res["ekf_gps_glitching_rtl"] == {"fraction": 1.0, "onsets": 1}  # the return home, counted apart
