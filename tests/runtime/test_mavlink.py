"""MAVLink link: encoding, pymavlink and C++ MAVSDK peers, signing, inbound filtering, the sender thread.

Everything runs on 127.0.0.1 with free ports (bound to port 0 first), so the file runs in parallel with others and
needs no autopilot. pymavlink peers get their own MAVLink2 codec so that mavutil's global dialect is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pymavlink import mavutil
from pymavlink.dialects.v20 import ardupilotmega as D

import sarloc.runtime.mavlink as mv
from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkLink,
    MavlinkSender,
    gps_input_fields,
    gps_week_time,
    hil_gps_fields,
    load_signing_key,
)
from sarloc.runtime.types import NavState

KEY = bytes(range(101, 133))
OTHER_KEY = bytes(range(1, 33))
LAT, LON = 47.3977418, 8.5455939


# ------------------------------------------------------------------------------------------------------- helpers


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pymav(url: str, sysid: int = 1, compid: int = 1, key: bytes | None = None, link_id: int = 7):
    """A pymavlink mavutil connection with its own MAVLink2 codec (and signing when ``key`` is given)."""
    conn = mavutil.mavlink_connection(url, source_system=sysid, source_component=compid)
    conn.mav = D.MAVLink(conn, srcSystem=sysid, srcComponent=compid)
    conn.mav.robust_parsing = True
    conn.first_byte = False
    if key is not None:
        conn.setup_signing(key, sign_outgoing=True, allow_unsigned_callback=lambda mav, msg_id: False, link_id=link_id)
    return conn


def collect(conn, seconds: float, types: set[str] | None = None) -> list:
    """Every message ``conn`` decodes in ``seconds`` (BAD_DATA included unless ``types`` filters it out)."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        m = conn.recv_msg()
        if m is None:
            time.sleep(0.002)
        elif types is None or m.get_type() in types:
            m._rx_mono = time.monotonic()
            out.append(m)
    return out


def first(conn, type_: str, timeout_s: float = 3.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = conn.recv_msg()
        if m is None:
            time.sleep(0.002)
        elif m.get_type() == type_:
            return m
    return None


def poll_until(link: MavlinkLink, cond, timeout_s: float = 3.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        link.poll()
        if cond():
            return True
        time.sleep(0.003)
    return False


def nav(t_s: float | None = None, **kw) -> NavState:
    base = {"valid": True, "lat_deg": LAT, "lon_deg": LON, "horiz_accuracy_m": 7.5, "satellites": 10}
    base.update(kw)
    return NavState(t_s=time.time() if t_s is None else t_s, **base)


def key_file(tmp_path, content: bytes = KEY, mode: int = 0o600, name: str = "key"):
    p = tmp_path / name
    p.write_bytes(content)
    p.chmod(mode)
    return p


@pytest.fixture
def links():
    """Close every link a test opens."""
    made: list[MavlinkLink] = []

    def make(**kw) -> MavlinkLink:
        link = MavlinkLink(MavlinkConfig(**kw))
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def signature_timestamp(m) -> int:
    """The 48-bit timestamp of a signed MAVLink2 packet (10 us units since 2015-01-01)."""
    return int.from_bytes(bytes(m.get_msgbuf()[-12:-6]), "little")


def signing_units(unix_s: float) -> int:
    return int((unix_s - mv.SIGNING_EPOCH_UNIX_S) * 100_000)


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


# ------------------------------------------------------------------------------------------------------ signing


def test_key_file_permissions_and_formats(tmp_path):
    loose = key_file(tmp_path, mode=0o644, name="loose")
    with pytest.raises(ConfigError, match=f"chmod 600 {loose}") as e:
        load_signing_key(loose)
    assert "\n" not in str(e.value)
    assert load_signing_key(key_file(tmp_path, name="raw")) == KEY
    assert load_signing_key(key_file(tmp_path, KEY.hex().encode() + b"\n", name="hex")) == KEY
    with pytest.raises(ConfigError, match="32 raw bytes or 64 hex"):
        load_signing_key(key_file(tmp_path, b"short", name="short"))
    with pytest.raises(ConfigError, match="all zeros"):
        load_signing_key(key_file(tmp_path, bytes(32), name="zeros"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="chmod 600"):
        MavlinkLink(MavlinkConfig(url="udpout:127.0.0.1:9", signing_key_file=str(loose)))


def test_outbound_messages_are_signed(tmp_path, links):
    port_ok, port_bad = free_port(), free_port()
    right = pymav(f"udpin:127.0.0.1:{port_ok}", key=KEY)
    wrong = pymav(f"udpin:127.0.0.1:{port_bad}", key=OTHER_KEY)
    try:
        kf = str(key_file(tmp_path))
        a = links(url=f"udpout:127.0.0.1:{port_ok}", signing_key_file=kf, signing_link_id=3)
        b = links(url=f"udpout:127.0.0.1:{port_bad}", signing_key_file=kf)
        for _ in range(3):
            a.send_heartbeat()
            b.send_heartbeat()
        hb = first(right, "HEARTBEAT")
        assert hb is not None and hb._signed and hb._link_id == 3
        got = collect(wrong, 0.3)
        assert got and all(m.get_type() == "BAD_DATA" and "signature" in m.reason for m in got)
        assert wrong.mav.signing.badsig_count >= 1
    finally:
        right.close()
        wrong.close()


def test_signing_timestamp_follows_the_wall_clock(tmp_path, links):
    """The timestamp was taken once at start (+1 per packet): after an autopilot reboot it fell behind."""
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}", key=KEY)
    wall = FakeClock(time.time() + 5.0)
    link = MavlinkLink(
        MavlinkConfig(url=f"udpout:127.0.0.1:{port}", signing_key_file=str(key_file(tmp_path)), request_streams=False),
        clock_wall=wall,
    )
    try:
        stamps = []
        for step in (0.0, 3600.0, -600.0):  # an hour later, then the wall clock stepped back 10 min
            wall.t += step
            assert link.send_heartbeat()
            hb = first(peer, "HEARTBEAT")
            assert hb is not None and hb._signed
            stamps.append(signature_timestamp(hb))
        assert abs(stamps[0] - signing_units(wall.t - 3000.0)) <= 2
        assert abs(stamps[1] - signing_units(wall.t + 600.0)) <= 2  # follows the wall clock forward
        assert stamps[2] == stamps[1] + 1  # never backwards: +1 per packet while the clock is behind
    finally:
        link.close()
        peer.close()


def test_signed_autopilot_while_not_signing_is_counted_and_warned_once(links, caplog):
    """A signing autopilot drops our unsigned packets silently; the only sign of it is its own signed traffic."""
    caplog.set_level(logging.WARNING, logger="sarloc.runtime.mavlink")
    port = free_port()
    link = links(url=f"udpin:127.0.0.1:{port}", request_streams=False)
    ap = pymav(f"udpout:127.0.0.1:{port}", key=KEY)
    try:
        for _ in range(3):
            ap.mav.attitude_send(0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.stats["received_signed_while_unsigned"] == 3)
        assert link.heading_deg() == pytest.approx(math.degrees(0.5))  # still read: it cannot be verified anyway
        warnings = [r.getMessage() for r in caplog.records if "signs its messages" in r.getMessage()]
        assert len(warnings) == 1
        assert "set signing_key_file" in warnings[0] and "MAVn_OPTIONS bit 0" in warnings[0]
    finally:
        ap.close()


def test_inbound_signing_accepts_right_key_and_counts_the_rest(tmp_path, links, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    link = links(url=f"udpin:127.0.0.1:{port}", signing_key_file=str(key_file(tmp_path)))
    good = pymav(f"udpout:127.0.0.1:{port}", key=KEY, link_id=1)
    forged = pymav(f"udpout:127.0.0.1:{port}", key=OTHER_KEY, link_id=1)
    plain = pymav(f"udpout:127.0.0.1:{port}")
    try:
        # a forged packet claiming the same stream with a timestamp an hour ahead must not lock out genuine ones
        forged.mav.signing.timestamp += 3600 * 100_000
        forged.mav.attitude_send(0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0)
        plain.mav.attitude_send(0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.stats["dropped_unsigned"] >= 1 and link.stats["dropped_bad_signature"])
        assert link.heading_deg() is None

        msg = good.mav.attitude_encode(0, 0.0, 0.0, math.radians(-90.0), 0.0, 0.0, 0.0)
        good.mav.send(msg)
        assert poll_until(link, lambda: link.heading_deg() is not None)
        assert link.heading_deg() == pytest.approx(270.0)

        good.write(msg.get_msgbuf())  # a replay of the same signed bytes
        assert poll_until(link, lambda: link.stats["dropped_bad_signature"] >= 2)
        s = link.stats
        assert s["received_ATTITUDE"] == 1 and s["dropped_unsigned"] == 1 and s["dropped_bad_signature"] == 2
    finally:
        for c in (good, forged, plain):
            c.close()
    assert KEY.hex() not in caplog.text and repr(KEY) not in caplog.text and KEY.hex()[:8] not in caplog.text
    assert "sha256" in caplog.text


# ------------------------------------------------------------------------------------------------------ inbound


def test_inbound_heading_sysid_filter_and_position_prior(links):
    port = free_port()
    clock = FakeClock()
    link = MavlinkLink(MavlinkConfig(url=f"udpin:127.0.0.1:{port}"), clock_mono=clock)
    ap = pymav(f"udpout:127.0.0.1:{port}", sysid=1, compid=1)
    intruder = pymav(f"udpout:127.0.0.1:{port}", sysid=7, compid=1)
    gimbal = pymav(f"udpout:127.0.0.1:{port}", sysid=1, compid=154)
    try:
        intruder.mav.attitude_send(0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
        gimbal.mav.attitude_send(0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.stats["dropped_foreign_sysid"] and link.stats["dropped_other_component"])
        assert link.heading_deg() is None

        ap.mav.vfr_hud_send(20.0, 21.0, 123, 50, 100.0, 0.0)
        assert poll_until(link, lambda: link.heading_deg() is not None)
        assert link.heading_deg() == 123.0  # VFR_HUD while there is no ATTITUDE
        ap.mav.attitude_send(0, 0.0, 0.0, math.radians(-30.0), 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.stats.get("received_ATTITUDE") == 1)
        assert link.heading_deg() == pytest.approx(330.0)  # ATTITUDE preferred, wrapped to 0..360

        ap.mav.global_position_int_send(5000, round(LAT * 1e7), round(LON * 1e7), 512_300, 120_000, 300, -400, 50, 4500)
        assert poll_until(link, lambda: link.position_prior() is not None)
        p = link.position_prior()
        assert (p.lat_deg, p.lon_deg) == pytest.approx((LAT, LON), abs=1e-7)
        assert (p.alt_m, p.relative_alt_m, p.heading_deg) == pytest.approx((512.3, 120.0, 45.0))
        assert p.vel_ned_mps == pytest.approx((3.0, -4.0, 0.5))

        clock.t += 2.5  # older than stale_after_s = 2.0
        assert link.heading_deg() is None and link.position_prior() is None
        assert link.heading_deg(max_age_s=10.0) == pytest.approx(330.0)
    finally:
        link.close()
        for c in (ap, intruder, gimbal):
            c.close()


def test_inbound_speeds_attitude_and_autopilot_clock():
    port = free_port()
    mono, wall = FakeClock(), FakeClock(1_750_000_000.0)
    cfg = MavlinkConfig(url=f"udpin:127.0.0.1:{port}", request_streams=False)
    link = MavlinkLink(cfg, clock_mono=mono, clock_wall=wall)
    ap = pymav(f"udpout:127.0.0.1:{port}")
    try:
        assert link.airspeed_mps() is None and link.autopilot_clock() is None and link.clock_offset_s() is None
        ap.mav.vfr_hud_send(21.5, 19.0, 90, 50, 100.0, 0.0)
        ap.mav.attitude_send(0, 0.0, 0.0, math.radians(-45.0), 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.attitude() is not None and link.groundspeed_mps() is not None)
        assert link.airspeed_mps() == (21.5, mono.t) and link.airspeed_mps().rx_mono_s == mono.t
        assert link.groundspeed_mps().mps == 19.0
        assert link.attitude() == (mono.t, pytest.approx(315.0)) and link.attitude().yaw_deg == pytest.approx(315.0)

        for boot_ms, offset_s in ((60_000, 0.30), (60_500, 0.20), (61_000, 0.25), (61_500, 5.0)):
            ap.mav.system_time_send(round((wall.t + offset_s) * 1e6), boot_ms)
        assert poll_until(link, lambda: link.stats.get("received_SYSTEM_TIME") == 4)
        c = link.autopilot_clock()
        assert c.time_unix_s == pytest.approx(wall.t + 5.0) and c.time_boot_s == 61.5
        assert (c.rx_wall_s, c.rx_mono_s) == (wall.t, mono.t)
        assert link.clock_offset_s() == pytest.approx(0.275, abs=1e-6)  # median: one outlier does not move it
        assert link.stats["autopilot_reboots"] == 0

        mono.t += 2.5  # older than stale_after_s
        assert link.airspeed_mps() is None and link.attitude() is None and link.clock_offset_s() is None
        assert link.groundspeed_mps(max_age_s=5.0) is not None and link.clock_offset_s(max_age_s=5.0) is not None

        ap.mav.system_time_send(0, 64_100)  # the autopilot has no UNIX time
        assert poll_until(link, lambda: link.stats.get("received_SYSTEM_TIME") == 5)
        assert link.autopilot_clock().time_unix_s is None and link.clock_offset_s() is None
    finally:
        link.close()
        ap.close()


def test_stream_requests_retry_missing_and_follow_a_reboot(links, caplog):
    caplog.set_level(logging.WARNING, logger="sarloc.runtime.mavlink")
    port = free_port()
    ap = pymav(f"udpin:127.0.0.1:{port}")  # the autopilot's side
    mono = FakeClock()
    link = MavlinkLink(MavlinkConfig(url=f"udpout:127.0.0.1:{port}", stream_rate_hz=8.0), clock_mono=mono)

    def requests() -> dict[int, float]:
        got = collect(ap, 0.15, {"COMMAND_LONG"})
        assert all((m.target_system, m.target_component, m.command) == (1, 1, 511) for m in got)
        return {round(m.param1): m.param2 for m in got}

    ids = {n: getattr(D, f"MAVLINK_MSG_ID_{n}") for n in mv.INBOUND_TYPES}
    try:
        link.poll()
        first_round = requests()
        assert first_round == {i: (5e5 if n == "SYSTEM_TIME" else 1.25e5) for n, i in ids.items()}
        link.poll()
        assert requests() == {}  # not again before the retry interval

        for k, boot_ms in enumerate((100_000, 102_500, 105_000)):  # everything but GPS2_RAW arrives
            ap.mav.attitude_send(0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0)
            ap.mav.vfr_hud_send(20.0, 20.0, 10, 50, 100.0, 0.0)
            ap.mav.global_position_int_send(0, round(LAT * 1e7), round(LON * 1e7), 0, 0, 0, 0, 0, 0)
            ap.mav.gps_raw_int_send(0, 3, round(LAT * 1e7), round(LON * 1e7), 0, 100, 100, 0, 0, 10)
            ap.mav.system_time_send(0, boot_ms)
            ap.mav.wind_send(270.0, 5.0, 0.0)  # from the west, 5 m/s
            assert poll_until(link, lambda k=k: link.stats["received"] == 6 * (k + 1))
            mono.t += (2.5, 2.5, 1.6)[k]
            link.poll()
            if k == 1:  # GPS2_RAW's retry interval doubled to 4 s; the others are fresh (< 3 s)
                assert requests() == {}
            else:  # only the one still missing is asked for again
                assert requests() == {ids["GPS2_RAW"]: 1.25e5}
        assert link.stats["autopilot_reboots"] == 0
        w = link.wind(max_age_s=10.0)  # the air moves east
        assert w is not None and w.east_mps == pytest.approx(5.0) and w.north_mps == pytest.approx(0.0, abs=1e-9)

        ap.mav.system_time_send(0, 1_200)  # boot time went back: the autopilot rebooted and forgot the intervals
        assert poll_until(link, lambda: link.stats["autopilot_reboots"] == 1)
        assert requests() == {i: v for i, v in first_round.items() if i != ids["SYSTEM_TIME"]}  # SYSTEM_TIME flows
        ap.mav.system_time_send(0, 1_700)
        assert poll_until(link, lambda: link.stats.get("received_SYSTEM_TIME") == 5)
        assert link.stats["autopilot_reboots"] == 1
        assert sum("rebooted" in r.getMessage() for r in caplog.records) == 1

        quiet = links(url=f"udpout:127.0.0.1:{port}", request_streams=False)
        quiet.poll()
        assert requests() == {} and "sent_COMMAND_LONG" not in quiet.stats
    finally:
        link.close()
        ap.close()


def test_echo_check_counts_matches_and_warns_once_when_missing(caplog):
    caplog.set_level(logging.INFO, logger="sarloc.runtime.mavlink")
    port = free_port()
    ap = pymav(f"udpin:127.0.0.1:{port}")
    mono = FakeClock()
    cfg = MavlinkConfig(url=f"udpout:127.0.0.1:{port}", echo_timeout_s=1.0, request_streams=False, gps_id=1)
    link = MavlinkLink(cfg, clock_mono=mono)
    lat7, lon7 = round(LAT * 1e7), round(LON * 1e7)
    north_3m, north_100m = round(3.0 / 111_319.49 * 1e7), round(100.0 / 111_319.49 * 1e7)

    def echo(msg: str, lat: int, fix: int = 3) -> None:
        if msg == "GPS_RAW_INT":
            ap.mav.gps_raw_int_send(0, fix, lat, lon7, 0, 150, 65535, 0, 0, 10)
        else:
            ap.mav.gps2_raw_send(0, fix, lat, lon7, 0, 150, 65535, 0, 0, 10, 0, 0)

    def missing() -> list[str]:
        return [r.getMessage() for r in caplog.records if "does not echo" in r.getMessage()]

    try:
        assert link.echo_status()["ok"] is None
        assert link.send_nav(nav()) is not None
        assert first(ap, "GPS_INPUT") is not None  # the autopilot side now knows where to answer
        echo("GPS_RAW_INT", lat7)  # either message may carry our instance (GPS auto-switch)
        assert poll_until(link, lambda: link.stats["echo_ok"] == 1)
        st = link.echo_status()
        assert st["ok"] is True and st["last_echo_message"] == "GPS_RAW_INT" and st["last_echo_age_s"] == 0.0

        for _ in range(12):  # 1.2 s of valid positions, no echo
            mono.t += 0.1
            link.send_nav(nav())
        echo("GPS_RAW_INT", lat7 + north_100m)  # 100 m off: not ours
        echo("GPS2_RAW", lat7, fix=1)  # no fix: not an echo
        assert poll_until(link, lambda: link.stats["received"] == 3)
        assert link.stats["echo_missing"] == 1 and link.stats["echo_ok"] == 1
        st = link.echo_status()
        assert st["ok"] is False and st["unechoed_s"] == pytest.approx(1.1)  # since the first unechoed send
        for _ in range(20):
            mono.t += 0.1
            link.send_nav(nav())
        assert link.stats["echo_missing"] == 1 and len(missing()) == 1  # warned once
        assert "check GPS2_TYPE=14, the port, and signing" in missing()[0]

        echo("GPS2_RAW", lat7 + north_3m)  # within a few metres of a position sent in the last 2 s
        assert poll_until(link, lambda: link.stats["echo_ok"] == 2)
        assert link.echo_status()["ok"] is True and link.echo_status()["last_echo_message"] == "GPS2_RAW"

        mono.t += 3.0  # positions sent more than 2 s ago do not match
        echo("GPS_RAW_INT", lat7)
        assert poll_until(link, lambda: link.stats["received"] == 5)
        assert link.stats["echo_ok"] == 2
    finally:
        link.close()
        ap.close()


def test_require_autopilot_makes_silence_fatal(tmp_path):
    port = free_port()
    mono = FakeClock()
    url = f"udpin:127.0.0.1:{port}"
    link = MavlinkLink(MavlinkConfig(url=url, require_autopilot_s=1.0, request_streams=False), clock_mono=mono)
    tolerant = MavlinkLink(MavlinkConfig(url=f"udpin:127.0.0.1:{free_port()}"), clock_mono=mono)
    ap = pymav(f"udpout:127.0.0.1:{port}")
    try:
        assert link.fatal_reason() is None
        mono.t += 1.5
        why = link.fatal_reason()
        assert why == (
            f"no message from autopilot 1/1 on {url} for 1.5 s: check the url, the autopilot's "
            "SERIALn_PROTOCOL=2 and signing"
        )
        ap.mav.heartbeat_send(2, 3, 0, 0, 4)
        assert poll_until(link, lambda: link.stats.get("received_HEARTBEAT") == 1)
        assert link.fatal_reason() is None
        mono.t += 12.0
        assert "for 12 s (it was heard before)" in link.fatal_reason()
        assert tolerant.fatal_reason() is None  # require_autopilot_s=None: silence is not fatal
        link.close()
        assert link.fatal_reason() is None
    finally:
        link.close()
        tolerant.close()
        ap.close()

    port = free_port()
    cfg = MavlinkConfig(
        url=f"udpin:127.0.0.1:{port}", require_autopilot_s=1.0, signing_key_file=str(key_file(tmp_path))
    )
    signed = MavlinkLink(cfg, clock_mono=mono)
    plain = pymav(f"udpout:127.0.0.1:{port}")
    try:
        plain.mav.heartbeat_send(2, 3, 0, 0, 4)
        assert poll_until(signed, lambda: signed.stats["dropped_unsigned"] == 1)
        mono.t += 2.0
        why = signed.fatal_reason()
        assert "1 unsigned and 0 badly signed messages were dropped" in why and "\n" not in why
    finally:
        signed.close()
        plain.close()


def test_refused_tcp_is_retried_and_reported_when_required():
    """A TCP autopilot (or router) not up yet is not a configuration error: fatal_reason reports it after the wait."""
    mono = FakeClock()
    url = f"tcp:127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    link = MavlinkLink(MavlinkConfig(url=url, require_autopilot_s=2.0), clock_mono=mono)
    try:
        assert not link.connected and link.fatal_reason() is None
        mono.t += 3.0
        link.poll()
        why = link.fatal_reason()
        assert why.startswith(f"no message from autopilot 1/1 on {url} for 3.0 s")
        assert "the link is down" in why and "Connection refused" in why and "\n" not in why
    finally:
        link.close()


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "so_reuseaddr"])
def test_busy_udp_port_is_a_config_error_when_required(reuse, caplog):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse:  # pymavlink itself binds udpin with SO_REUSEADDR: a second one would share the port silently
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    url = f"udpin:127.0.0.1:{holder.getsockname()[1]}"
    try:
        with pytest.raises(ConfigError, match="holds the port") as e:
            MavlinkLink(MavlinkConfig(url=url, require_autopilot_s=10.0))
        assert url in str(e.value) and "in use" in str(e.value) and "\n" not in str(e.value)

        caplog.set_level(logging.WARNING, logger="sarloc.runtime.mavlink")
        mono = FakeClock()
        link = MavlinkLink(MavlinkConfig(url=url), clock_mono=mono)  # not required: keep retrying
        try:
            assert not link.connected
            for _ in range(3):
                mono.t += 10.0
                link.poll()
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and url in errors[0].getMessage()
        finally:
            link.close()
    finally:
        holder.close()


def test_udpin_replies_only_to_the_authentic_autopilot(links):
    port = free_port()
    link = links(url=f"udpin:127.0.0.1:{port}", request_streams=False)
    ap = pymav(f"udpout:127.0.0.1:{port}", sysid=1, compid=1)
    intruder = pymav(f"udpout:127.0.0.1:{port}", sysid=9, compid=1)
    try:
        assert not link.send_heartbeat() and link.stats["dropped_no_peer"] == 1  # nobody heard yet
        intruder.mav.heartbeat_send(6, 8, 0, 0, 4)
        assert poll_until(link, lambda: link.stats["dropped_foreign_sysid"] == 1)
        assert not link.send_heartbeat() and link.stats["dropped_no_peer"] == 2  # not a reply target
        ap.mav.heartbeat_send(2, 3, 0, 0, 4)
        assert poll_until(link, lambda: link.stats.get("received_HEARTBEAT") == 1)
        assert link.send_heartbeat()
        hb = first(ap, "HEARTBEAT")
        assert hb is not None and hb.get_srcComponent() == 191
        assert not [m for m in collect(intruder, 0.2) if m.get_type() == "HEARTBEAT"]
    finally:
        ap.close()
        intruder.close()


def test_inbound_rate_limit_counts_drops(links):
    port = free_port()
    link = links(url=f"udpin:127.0.0.1:{port}", inbound_max_rate_hz=5.0)
    ap = pymav(f"udpout:127.0.0.1:{port}")
    try:
        for i in range(40):
            ap.mav.attitude_send(i, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0)
        assert poll_until(link, lambda: link.stats["received"] + link.stats["dropped_rate_limited"] >= 40)
        s = link.stats
        assert s["received"] <= 8 and s["dropped_rate_limited"] >= 32
    finally:
        ap.close()


def test_garbage_on_the_socket_never_crashes_poll(links):
    port = free_port()
    link = links(url=f"udpin:127.0.0.1:{port}")
    ap = pymav(f"udpout:127.0.0.1:{port}")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        good = ap.mav.attitude_encode(0, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0).pack(ap.mav)
        bad_crc = bytearray(good)
        bad_crc[-1] ^= 0xFF
        rng = random.Random(5)
        junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(30)]
        junk += [good[:9], bytes(bad_crc), b"\xfd", b"\xfe\xff" + b"\x00" * 10, b""]
        for j in junk:
            raw.sendto(j, ("127.0.0.1", port))
        for _ in range(20):
            link.poll()
        raw.sendto(good, ("127.0.0.1", port))
        assert poll_until(link, lambda: link.heading_deg() is not None)
        assert link.heading_deg() == pytest.approx(math.degrees(0.25))
        assert link.stats["parse_errors"] >= 2
    finally:
        raw.close()
        ap.close()


# ------------------------------------------------------------------------------------------------ sender thread


def test_sender_steady_rate(links):
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}")
    link = links(url=f"udpout:127.0.0.1:{port}", gps_rate_hz=5.0, heartbeat_hz=1.0)
    try:
        with MavlinkSender(link, lambda now_s: nav(now_s)) as sender:
            got = collect(peer, 1.5, {"GPS_INPUT", "HEARTBEAT"})
            assert sender.running
        assert not sender.running
        gps = [m for m in got if m.get_type() == "GPS_INPUT"]
        hb = [m for m in got if m.get_type() == "HEARTBEAT"]
        assert 6 <= len(gps) <= 10, len(gps)
        assert 1 <= len(hb) <= 3, len(hb)
        assert all(m.fix_type == 3 for m in gps)
        gaps = sorted(b._rx_mono - a._rx_mono for a, b in itertools.pairwise(gps))
        assert 0.15 <= gaps[len(gaps) // 2] <= 0.25
        assert sender.stats["state_fn_errors"] == 0
    finally:
        peer.close()


def test_sender_sends_no_fix_when_state_fn_raises_or_is_stale(links):
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}")
    link = links(url=f"udpout:127.0.0.1:{port}", gps_rate_hz=20.0)

    def broken(now_s: float) -> NavState:
        raise RuntimeError("filter exploded")

    try:
        with MavlinkSender(link, broken) as sender:
            gps = collect(peer, 0.4, {"GPS_INPUT"})
            assert sender.running
        assert gps and all(m.fix_type == 1 and m.lat == 0 for m in gps)
        assert sender.stats["state_fn_errors"] >= 3

        with MavlinkSender(link, lambda now_s: nav(now_s - 10.0)) as sender:  # 10 s old > stale_after_s
            gps = collect(peer, 0.3, {"GPS_INPUT"})
        assert gps and all(m.fix_type == 1 for m in gps)
        assert sender.stats["stale_states"] >= 2

        with MavlinkSender(link, lambda now_s: "not a state") as sender:
            gps = collect(peer, 0.2, {"GPS_INPUT"})
        assert gps and all(m.fix_type == 1 for m in gps)
    finally:
        peer.close()


def test_sender_survives_absent_udp_peer_and_resumes(links):
    port = free_port()
    link = links(url=f"udpout:127.0.0.1:{port}", gps_rate_hz=10.0)
    with MavlinkSender(link, lambda now_s: nav(now_s)) as sender:
        time.sleep(0.5)  # nobody listens on `port`
        assert sender.running
        sent_before = link.stats["sent_GPS_INPUT"]
        assert sent_before >= 3
        peer = pymav(f"udpin:127.0.0.1:{port}")
        try:
            gps = collect(peer, 0.6, {"GPS_INPUT"})
        finally:
            peer.close()
        assert len(gps) >= 3 and gps[0].fix_type == 3
        assert sender.running


def test_sender_reconnects_after_tcp_drop(links):
    port = free_port(socket.SOCK_STREAM)

    def listen() -> socket.socket:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        srv.settimeout(5.0)
        return srv

    def read_gps_input(conn: socket.socket, timeout_s: float = 3.0):
        parser = D.MAVLink(None)
        parser.robust_parsing = True
        conn.settimeout(0.2)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                for m in parser.parse_buffer(conn.recv(4096)) or []:
                    if m.get_type() == "GPS_INPUT":
                        return m
        return None

    srv = listen()
    link = links(url=f"tcp:127.0.0.1:{port}", gps_rate_hz=10.0, reconnect_min_s=0.05, reconnect_max_s=0.2)
    with MavlinkSender(link, lambda now_s: nav(now_s)) as sender:
        conn, _ = srv.accept()
        assert read_gps_input(conn) is not None
        conn.close()  # the autopilot side goes away
        srv.close()
        deadline = time.monotonic() + 3.0
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.connected and sender.running
        time.sleep(0.3)  # a few failed reconnects (connection refused)
        srv = listen()
        try:
            conn, _ = srv.accept()
            m = read_gps_input(conn)
            conn.close()
        finally:
            srv.close()
        assert m is not None and m.fix_type == 3
        assert sender.running
    assert link.stats["reconnects"] >= 1
    assert link.stats["send_errors"] + link.stats["dropped_link_down"] >= 1


def test_stop_sends_a_final_no_fix_promptly(links):
    port = free_port()
    peer = pymav(f"udpin:127.0.0.1:{port}")
    link = links(url=f"udpout:127.0.0.1:{port}", gps_rate_hz=0.5, heartbeat_hz=0.2, request_streams=False)
    try:
        sender = MavlinkSender(link, lambda now_s: nav(now_s), poll_inbound=False).start()
        g = first(peer, "GPS_INPUT")
        assert g is not None and g.fix_type == 3
        time.sleep(0.05)  # the thread now sleeps until its next tick, seconds away
        t0 = time.monotonic()
        sender.stop()
        assert time.monotonic() - t0 < 0.5
        g = first(peer, "GPS_INPUT", timeout_s=1.0)
        assert g is not None and g.fix_type == 1 and g.lat == g.lon == 0
        assert (link.stats["sent_GPS_INPUT"], link.stats["nofix_sent"]) == (2, 1)
        sender.stop()  # again: nothing more
        quiet = MavlinkSender(link, lambda now_s: nav(now_s), poll_inbound=False).start()
        assert first(peer, "GPS_INPUT") is not None
        quiet.stop(send_nofix=False)
        assert (link.stats["sent_GPS_INPUT"], link.stats["nofix_sent"]) == (3, 1)
        assert not [m for m in collect(peer, 0.1, {"GPS_INPUT"})]
    finally:
        peer.close()


def test_stop_joins_and_link_close_is_idempotent(links):
    link = links(url=f"udpout:127.0.0.1:{free_port()}")
    sender = MavlinkSender(link, lambda now_s: nav(now_s)).start()
    assert sender.running and any(t.name == "sarloc-mavlink-sender" and t.daemon for t in threading.enumerate())
    sender.stop()
    assert not sender.running
    link.close()
    link.close()
    assert not link.send_heartbeat() and link.stats["dropped_link_down"] == 1
    assert link.poll() == 0


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_a_config_error(tmp_path):
    p = key_file(tmp_path, mode=0o000)
    with pytest.raises(ConfigError):
        load_signing_key(p)


def test_config_number_beyond_float_range_is_refused():
    """An integer beyond the float range gave OverflowError in MavlinkConfig's rate checks."""
    from sarloc.runtime.mavlink import MavlinkConfig

    with pytest.raises(ConfigError, match=r"gps_rate_hz=1000.* is invalid"):
        MavlinkConfig(gps_rate_hz=10**400)
