"""MAVLink link tests: import and config, pure encoding, round trips with pymavlink and an independent C++ MAVSDK peer.

Shared helpers in ``tests/mavlink_helpers.py``.
Everything runs on 127.0.0.1 with free ports (bound to port 0 first), so the file runs in parallel with others and
needs no autopilot. pymavlink peers get their own MAVLink2 codec so that mavutil's global dialect is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import textwrap
import time

import pytest
from mavlink_helpers import (
    LAT,
    LON,
    first,
    free_port,
    links_fixture,  # noqa: F401  (the links fixture)
    nav,
    pymav,
)
from pymavlink.dialects.v20 import ardupilotmega as D

import sarloc.runtime.mavlink as mv
from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkLink,
    gps_input_fields,
    gps_week_time,
    hil_gps_fields,
)
from sarloc.runtime.types import NavState

# ------------------------------------------------------------------------------------------- import and config


def test_import_needs_neither_torch_nor_pymavlink():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import sarloc.runtime.mavlink as m
        cfg = m.MavlinkConfig()
        loaded = [k for k in sys.modules if k.split(".")[0] == "pymavlink" or k.startswith("sarloc.trainer")]
        assert not loaded, loaded
        print("ok", cfg.flavour)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok ardupilot"


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"flavour": "inav"}, "flavour"),
        ({"source_component": 0}, "source_component"),
        ({"autopilot_system": 256}, "autopilot_system"),
        ({"gps_rate_hz": 0.0}, "gps_rate_hz"),
        ({"heartbeat_hz": float("nan")}, "heartbeat_hz"),
        ({"signing_link_id": -1}, "signing_link_id"),
        ({"reconnect_min_s": 2.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"url": ""}, "url"),
        ({"echo_timeout_s": 0.0}, "echo_timeout_s"),
        ({"stream_rate_hz": float("inf")}, "stream_rate_hz"),
        ({"stream_rate_hz": -1.0}, "stream_rate_hz"),
        ({"require_autopilot_s": 0.0}, "require_autopilot_s"),
        ({"require_autopilot_s": "10"}, "require_autopilot_s"),
        ({"request_streams": 1}, "request_streams"),
    ],
)
def test_config_rejects_bad_values(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        MavlinkConfig(**kw)
    assert "\n" not in str(e.value)


def test_defaults_give_the_gps_health_check_margin():
    """ArduPilot's GPS health check needs an average gap under 215 ms: 5 Hz (200 ms) was at the edge."""
    cfg = MavlinkConfig()
    assert cfg.gps_rate_hz == 10.0 and 1.0 / cfg.gps_rate_hz < 0.215 / 2
    assert (cfg.echo_timeout_s, cfg.request_streams, cfg.stream_rate_hz) == (10.0, True, 10.0)
    assert cfg.require_autopilot_s is None


def test_bad_url_and_dialect_are_config_errors():
    with pytest.raises(ConfigError, match="malformed"):
        MavlinkLink(MavlinkConfig(url="udpout:no-port-here"))
    with pytest.raises(ConfigError, match="dialect"):
        MavlinkLink(MavlinkConfig(dialect="no_such_dialect"))
    assert MavlinkConfig().to_dict()["source_component"] == 191


# -------------------------------------------------------------------------------------------- pure encoding


def test_ignore_flag_constants_match_the_dialect():
    for name in ("ALT", "HDOP", "VDOP", "VEL_HORIZ", "VEL_VERT", "SPEED_ACCURACY"):
        assert getattr(mv, f"IGNORE_{name}") == getattr(D, f"GPS_INPUT_IGNORE_FLAG_{name}")
    assert mv.IGNORE_HORIZONTAL_ACCURACY == D.GPS_INPUT_IGNORE_FLAG_HORIZONTAL_ACCURACY
    assert mv.IGNORE_VERTICAL_ACCURACY == D.GPS_INPUT_IGNORE_FLAG_VERTICAL_ACCURACY
    assert mv.GPS_FIX_TYPE_3D_FIX == D.GPS_FIX_TYPE_3D_FIX and mv.GPS_FIX_TYPE_NO_FIX == D.GPS_FIX_TYPE_NO_FIX
    assert mv.MAV_TYPE_ONBOARD_CONTROLLER == D.MAV_TYPE_ONBOARD_CONTROLLER
    assert mv.MAV_AUTOPILOT_INVALID == D.MAV_AUTOPILOT_INVALID and mv.MAV_STATE_ACTIVE == D.MAV_STATE_ACTIVE


def test_gps_week_time():
    # 2024-01-01T00:00:00Z was a Monday: GPS week 2295, 1 day + 18 leap seconds into it
    assert gps_week_time(1_704_067_200.0) == (2295, 86_418_000)
    assert gps_week_time(mv.GPS_EPOCH_UNIX_S - mv.GPS_LEAP_S) == (0, 0)
    assert gps_week_time(1_704_067_200.25)[1] == 86_418_250


def test_gps_input_fields_flags_and_values():
    cfg = MavlinkConfig()
    t = 1_704_067_200.0
    f = gps_input_fields(nav(t), cfg)
    assert f["fix_type"] == 3
    assert (f["lat"], f["lon"]) == (round(LAT * 1e7), round(LON * 1e7))
    assert f["horiz_accuracy"] == 7.5 and f["hdop"] == pytest.approx(7.5 / cfg.hdop_uere_m)
    assert (f["time_week"], f["time_week_ms"], f["time_usec"]) == (2295, 86_418_000, 1_704_067_200_000_000)
    no_alt_no_vel = (
        mv.IGNORE_ALT
        | mv.IGNORE_VDOP
        | mv.IGNORE_VEL_HORIZ
        | mv.IGNORE_VEL_VERT
        | mv.IGNORE_SPEED_ACCURACY
        | mv.IGNORE_VERTICAL_ACCURACY
    )
    assert f["ignore_flags"] == no_alt_no_vel
    assert not f["ignore_flags"] & (mv.IGNORE_HDOP | mv.IGNORE_HORIZONTAL_ACCURACY)

    f = gps_input_fields(nav(t, vel_ned_mps=(3.0, 4.0, 0.5), speed_accuracy_mps=0.4), cfg)
    assert f["ignore_flags"] == mv.IGNORE_ALT | mv.IGNORE_VDOP | mv.IGNORE_VEL_VERT | mv.IGNORE_VERTICAL_ACCURACY
    assert (f["vn"], f["ve"], f["speed_accuracy"]) == (3.0, 4.0, 0.4)

    f = gps_input_fields(nav(t, alt_m=512.5, vel_ned_mps=(3.0, 4.0, 0.5)), cfg)
    assert f["ignore_flags"] == mv.IGNORE_VDOP | mv.IGNORE_VERTICAL_ACCURACY
    assert (f["alt"], f["vd"]) == (512.5, 0.5)

    assert gps_input_fields(nav(t, yaw_deg=0.0), cfg)["yaw"] == 36000
    assert gps_input_fields(nav(t, yaw_deg=-90.0), cfg)["yaw"] == 27000
    assert gps_input_fields(nav(t), cfg)["yaw"] == 0
    # a flight clock (not UNIX time): no GPS week, time_usec as given
    f = gps_input_fields(nav(12.5), cfg)
    assert (f["time_week"], f["time_week_ms"], f["time_usec"]) == (0, 0, 12_500_000)


@pytest.mark.parametrize(
    "state",
    [
        NavState(t_s=1e9 + 5, valid=False, lat_deg=LAT, lon_deg=LON, horiz_accuracy_m=3.0),
        NavState(t_s=1e9 + 5, valid=True, lat_deg=float("nan"), lon_deg=LON, horiz_accuracy_m=3.0),
        NavState(t_s=1e9 + 5, valid=True, lat_deg=LAT, lon_deg=LON, horiz_accuracy_m=float("inf")),
        NavState(t_s=1e9 + 5, valid=True, lat_deg=LAT, lon_deg=200.0, horiz_accuracy_m=3.0),
    ],
)
def test_unusable_states_encode_as_no_fix(state):
    f = gps_input_fields(state, MavlinkConfig())
    assert f["fix_type"] == 1 and f["lat"] == f["lon"] == 0 and f["satellites_visible"] == 0
    assert f["ignore_flags"] == 0xFF & ~mv.IGNORE_HDOP and f["hdop"] == pytest.approx(99.99)
    h = hil_gps_fields(state, MavlinkConfig(flavour="px4"))
    assert h["fix_type"] == 1 and h["lat"] == h["lon"] == 0 and h["eph"] == 65535


def test_hil_gps_fields_for_px4():
    cfg = MavlinkConfig(flavour="px4", gps_id=1)
    h = hil_gps_fields(nav(1e9 + 7, horiz_accuracy_m=12.34), cfg)
    assert h["fix_type"] == 3 and h["eph"] == 1234 and h["epv"] == 65535  # PX4 reads eph as cm
    assert h["vel"] == 65535 and h["cog"] == 65535 and h["alt"] == 0 and h["id"] == 1
    h = hil_gps_fields(nav(1e9 + 7, alt_m=100.0, vel_ned_mps=(0.0, 10.0, -1.0)), cfg)
    assert (h["vel"], h["ve"], h["vd"], h["cog"], h["alt"]) == (1000, 1000, -100, 9000, 100_000)


def test_altitude_with_vertical_accuracy_fills_vdop_and_epv():
    cfg = MavlinkConfig()
    t = 1e9 + 7
    f = gps_input_fields(nav(t, alt_m=812.0, vert_accuracy_m=6.0), cfg)
    assert f["ignore_flags"] == mv.IGNORE_VEL_HORIZ | mv.IGNORE_VEL_VERT | mv.IGNORE_SPEED_ACCURACY
    assert (f["alt"], f["vert_accuracy"]) == (812.0, 6.0)
    assert f["vdop"] == pytest.approx(6.0 / cfg.hdop_uere_m) and f["hdop"] == pytest.approx(7.5 / cfg.hdop_uere_m)
    full = nav(t, alt_m=812.0, vert_accuracy_m=6.0, vel_ned_mps=(1.0, 2.0, 0.5), speed_accuracy_mps=0.5)
    assert gps_input_fields(full, cfg)["ignore_flags"] == 0
    for state in (nav(t, vert_accuracy_m=6.0), nav(t, alt_m=812.0), nav(t, alt_m=812.0, vert_accuracy_m=math.nan)):
        f = gps_input_fields(state, cfg)  # no altitude, or no vertical accuracy: both vertical quality fields unknown
        assert f["ignore_flags"] & mv.IGNORE_VDOP and f["ignore_flags"] & mv.IGNORE_VERTICAL_ACCURACY
        assert f["vdop"] == f["vert_accuracy"] == 0.0
    assert gps_input_fields(nav(t, alt_m=812.0, vert_accuracy_m=6.0), cfg)["yaw"] == 0  # no yaw unless given

    px4 = MavlinkConfig(flavour="px4")
    assert hil_gps_fields(nav(t, alt_m=812.0, vert_accuracy_m=6.0), px4)["epv"] == 600
    assert hil_gps_fields(nav(t, vert_accuracy_m=6.0), px4)["epv"] == 65535
    assert hil_gps_fields(nav(t, alt_m=812.0), px4)["epv"] == 65535


# --------------------------------------------------------------------------------- round trip with pymavlink


def test_pymavlink_round_trip_heartbeat_and_gps_input(links):
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}", sysid=255, compid=190)
    try:
        link = links(url=f"udpout:127.0.0.1:{port}")
        assert link.send_heartbeat()
        hb = first(peer, "HEARTBEAT")
        assert hb is not None
        assert (hb.get_srcSystem(), hb.get_srcComponent()) == (1, 191)
        assert (hb.type, hb.autopilot, hb.system_status) == (
            D.MAV_TYPE_ONBOARD_CONTROLLER,
            D.MAV_AUTOPILOT_INVALID,
            D.MAV_STATE_ACTIVE,
        )
        assert hb.get_msgbuf()[0] == D.PROTOCOL_MARKER_V2  # MAVLink2 on the wire

        state = nav(vel_ned_mps=(1.0, -2.0, 0.0), speed_accuracy_mps=0.3)
        assert link.send_nav(state) is not None
        g = first(peer, "GPS_INPUT")
        assert g is not None and g.fix_type == 3
        assert abs(g.lat * 1e-7 - LAT) < 1e-7 and abs(g.lon * 1e-7 - LON) < 1e-7
        assert g.horiz_accuracy == pytest.approx(7.5) and g.speed_accuracy == pytest.approx(0.3)
        assert g.ignore_flags == mv.IGNORE_ALT | mv.IGNORE_VDOP | mv.IGNORE_VEL_VERT | mv.IGNORE_VERTICAL_ACCURACY
        assert (g.vn, g.ve) == (1.0, -2.0) and g.satellites_visible == 10 and g.time_week > 2000

        link.send_nav(NavState(t_s=time.time(), valid=False, lat_deg=LAT, lon_deg=LON))
        g = first(peer, "GPS_INPUT")
        assert g is not None and g.fix_type == 1 and g.lat == 0 and g.lon == 0 and g.satellites_visible == 0
        s = link.stats
        assert (s["sent_HEARTBEAT"], s["sent_GPS_INPUT"], s["nofix_sent"], s["send_errors"]) == (1, 2, 1, 0)
    finally:
        peer.close()


def test_px4_flavour_sends_hil_gps(links):
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}")
    try:
        link = links(url=f"udpout:127.0.0.1:{port}", flavour="px4")
        link.send_nav(nav(horiz_accuracy_m=4.0))
        m = first(peer, "HIL_GPS")
        assert m is not None and m.fix_type == 3 and m.eph == 400 and abs(m.lat * 1e-7 - LAT) < 1e-7
        assert (m.get_srcSystem(), m.get_srcComponent()) == (1, 191)
        assert link.stats["sent_HIL_GPS"] == 1
    finally:
        peer.close()


# ------------------------------------------------------------------------------------ independent C++ peer


def test_mavsdk_cpp_peer_decodes_heartbeat_and_gps_input(links):
    """The C++ MAVSDK library (libcmavsdk, bundled in the mavsdk wheel) discovers us and decodes our messages."""
    pytest.importorskip("mavsdk", reason="mavsdk (dev extra) not installed: no independent C++ MAVLink peer")
    try:
        from mavsdk.asyncio import ComponentType, Configuration, Mavsdk
        from mavsdk.asyncio.plugins.mavlink_direct import MavlinkDirectAsync
    except (ImportError, OSError) as e:  # the C++ library cannot load on this platform
        pytest.skip(f"mavsdk's C++ library cannot run here: {e}")

    port = free_port()
    link = links(url=f"udpout:127.0.0.1:{port}")

    async def next_message(direct, name: str):
        async with contextlib.aclosing(direct.subscribe_message(name)) as stream:
            async for msg in stream:
                return msg

    async def send_until(tasks, states) -> None:
        for i in range(200):
            if all(t.done() for t in tasks):
                return
            link.send_heartbeat()
            link.send_nav(states[i % len(states)])
            await asyncio.sleep(0.02)

    async def session():
        cfg = Configuration.create_with_component_type(ComponentType.GROUND_STATION)
        async with Mavsdk(cfg) as sdk:
            await sdk.add_any_connection(f"udpin://127.0.0.1:{port}")
            systems = []
            for _ in range(200):  # our heartbeat alone gets us discovered: no autopilot needed
                link.send_heartbeat()
                systems = await sdk.get_systems()
                if systems:
                    break
                await asyncio.sleep(0.02)
            assert systems, "MAVSDK did not discover component 191"
            system = systems[0]
            assert await system.get_system_id() == 1
            assert 191 in await system.component_ids()
            direct = MavlinkDirectAsync(system)

            tasks = [asyncio.create_task(next_message(direct, n)) for n in ("HEARTBEAT", "GPS_INPUT")]
            await asyncio.sleep(0.05)
            await send_until(tasks, [nav()])
            hb, gps = [await asyncio.wait_for(t, 5) for t in tasks]

            nofix_task = asyncio.create_task(next_message(direct, "GPS_INPUT"))
            await asyncio.sleep(0.05)
            await send_until([nofix_task], [NavState(t_s=time.time(), valid=False)])
            nofix = await asyncio.wait_for(nofix_task, 5)
            return hb, gps, nofix

    hb, gps, nofix = asyncio.run(asyncio.wait_for(session(), timeout=30))
    assert (hb.system_id, hb.component_id) == (1, 191)
    hbf = json.loads(hb.fields_json)
    assert (hbf["type"], hbf["autopilot"], hbf["system_status"]) == (18, 8, 4)
    f = json.loads(gps.fields_json)
    assert f["fix_type"] == 3 and f["lat"] == round(LAT * 1e7) and f["lon"] == round(LON * 1e7)
    assert f["horiz_accuracy"] == pytest.approx(7.5) and f["satellites_visible"] == 10
    assert f["ignore_flags"] & mv.IGNORE_ALT and f["ignore_flags"] & mv.IGNORE_VEL_HORIZ
    n = json.loads(nofix.fields_json)
    assert n["fix_type"] == 1 and n["lat"] == 0 and n["lon"] == 0
