"""MAVLink link tests: inbound filtering, autopilot state, stream requests, echo check, sockets.

Shared helpers in ``tests/mavlink_helpers.py``.
Everything runs on 127.0.0.1 with free ports (bound to port 0 first), so the file runs in parallel with others and
needs no autopilot. pymavlink peers get their own MAVLink2 codec so that mavutil's global dialect is left alone.
"""

from __future__ import annotations

import logging
import math
import random
import socket

import pytest
from mavlink_helpers import (
    LAT,
    LON,
    FakeClock,
    collect,
    first,
    free_port,
    key_file,
    links_fixture,  # noqa: F401  (the links fixture)
    nav,
    poll_until,
    pymav,
)
from pymavlink.dialects.v20 import ardupilotmega as D

import sarloc.runtime.mavlink as mv
from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkLink,
)

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
        ap.mav.attitude_send(0, math.radians(5.0), math.radians(-2.0), math.radians(-45.0), 0.0, 0.0, 0.0)
        # ArduPilot's OPTICAL_FLOW: time, sensor id, flow_x/_y (int16), the compensated rates (rad/s), quality,
        # height above ground, the raw rates
        ap.mav.optical_flow_send(1000, 0, 0, 0, 0.1, -0.2, 200, 30.0, 0.1, -0.2)
        assert poll_until(link, lambda: link.optical_flow() is not None and link.groundspeed_mps() is not None)
        assert link.airspeed_mps() == (21.5, mono.t) and link.airspeed_mps().rx_mono_s == mono.t
        assert link.groundspeed_mps().mps == 19.0
        assert link.attitude() == (mono.t, pytest.approx(315.0), pytest.approx(5.0), pytest.approx(-2.0))
        f = link.optical_flow()
        assert (f.comp_x_rad_s, f.comp_y_rad_s, f.ground_distance_m, f.quality) == (
            pytest.approx(0.1),
            pytest.approx(-0.2),
            30.0,
            200,
        )

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
        assert link.optical_flow() is None
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

        # everything but GPS2_RAW and OPTICAL_FLOW arrives (no second GNSS, no flow sensor)
        for k, boot_ms in enumerate((100_000, 102_500, 105_000)):
            ap.mav.attitude_send(0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0)
            ap.mav.vfr_hud_send(20.0, 20.0, 10, 50, 100.0, 0.0)
            ap.mav.global_position_int_send(0, round(LAT * 1e7), round(LON * 1e7), 0, 0, 0, 0, 0, 0)
            ap.mav.gps_raw_int_send(0, 3, round(LAT * 1e7), round(LON * 1e7), 0, 100, 100, 0, 0, 10)
            ap.mav.system_time_send(0, boot_ms)
            ap.mav.wind_send(270.0, 5.0, 0.0)  # from the west, 5 m/s
            assert poll_until(link, lambda k=k: link.stats["received"] == 6 * (k + 1))
            mono.t += (2.5, 2.5, 1.6)[k]
            link.poll()
            if k == 1:  # the missing ones' retry interval doubled to 4 s; the others are fresh (< 3 s)
                assert requests() == {}
            else:  # only the ones still missing are asked for again
                assert requests() == {ids["GPS2_RAW"]: 1.25e5, ids["OPTICAL_FLOW"]: 1.25e5}
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
        echo("GPS_RAW_INT", lat7)  # ArduPilot's GPS1: the GNSS receiver, never sarloc's echo with gps_id 1
        assert poll_until(link, lambda: link.stats["received"] == 1) and link.stats["echo_ok"] == 0
        echo("GPS2_RAW", lat7)
        assert poll_until(link, lambda: link.stats["echo_ok"] == 1)
        st = link.echo_status()
        assert st["ok"] is True and st["last_echo_message"] == "GPS2_RAW" and st["last_echo_age_s"] == 0.0

        for _ in range(12):  # 1.2 s of valid positions, no echo
            mono.t += 0.1
            link.send_nav(nav())
        echo("GPS2_RAW", lat7 + north_100m)  # 100 m off: not ours
        echo("GPS2_RAW", lat7, fix=1)  # no fix: not an echo
        assert poll_until(link, lambda: link.stats["received"] == 4)
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
        echo("GPS2_RAW", lat7)
        assert poll_until(link, lambda: link.stats["received"] == 6)
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


def test_the_autopilots_own_gnss_is_read_from_the_instance_sarloc_does_not_feed():
    """sarloc feeds GPS2 (gps_id 1): the autopilot's own receiver is GPS_RAW_INT, whatever its position (it agrees
    with sarloc's while sarloc is GNSS-aided); GPS2_RAW is sarloc's echo. Age from the autopilot's boot clock,
    accuracy from h_acc (else the HDOP), lost on a report without a 3-D fix, stale after stale_after_s."""
    port = free_port()
    mono = FakeClock()
    link = MavlinkLink(MavlinkConfig(url=f"udpin:127.0.0.1:{port}", request_streams=False, gps_id=1), clock_mono=mono)
    ap = pymav(f"udpout:127.0.0.1:{port}")
    lat7, lon7 = round(LAT * 1e7), round(LON * 1e7)
    n = 0

    def send(fn, *args) -> None:
        nonlocal n
        fn(*args)
        n += 1
        assert poll_until(link, lambda: link.stats["received"] == n)

    try:
        assert link.autopilot.gnss_message == "GPS_RAW_INT" and link.gnss() is None
        send(ap.mav.system_time_send, 0, 60_000)
        send(ap.mav.gps2_raw_send, 59_900_000, 3, lat7 + 1000, lon7, 0, 150, 65535, 0, 0, 10, 0, 0)
        assert link.gnss() is None  # sarloc's own instance
        send(ap.mav.gps_raw_int_send, 59_800_000, 3, lat7, lon7, 0, 121, 200, 0, 0, 10, 0, 1500)
        g = link.gnss()
        assert (g.lat_deg, g.lon_deg, g.h_acc_m, g.name) == pytest.approx((LAT, LON, 1.5, "GPS_RAW_INT"))
        assert g.age_s == pytest.approx(0.2, abs=1e-6)  # fix at boot 59.8 s, the autopilot's clock at 60.0 s
        mono.t += 0.5
        send(ap.mav.system_time_send, 0, 60_400)  # received 0.1 s late (a stall): the earlier one maps the clock
        send(ap.mav.gps_raw_int_send, 60_300_000, 6, lat7, lon7, 0, 150, 200, 0, 0, 10)
        assert link.gnss().h_acc_m == pytest.approx(7.5) and link.gnss().age_s == pytest.approx(0.2, abs=1e-6)
        send(ap.mav.gps_raw_int_send, 60_500_000, 1, 0, 0, 0, 65535, 65535, 0, 0, 0)
        assert link.gnss() is None  # lost: the earlier fix is not handed out again
        send(ap.mav.gps_raw_int_send, 60_700_000, 3, lat7, lon7, 0, 150, 200, 0, 0, 10)
        assert link.gnss() is not None
        mono.t += 2.5
        assert link.gnss() is None and link.gnss(max_age_s=5.0) is not None
    finally:
        link.close()
        ap.close()
    # sarloc on GPS1: the autopilot's own receiver is then reported in GPS2_RAW
    cfg = MavlinkConfig(url="udpin:127.0.0.1:0", request_streams=False, gps_id=0)
    assert mv.AutopilotState(cfg, None, {}, FakeClock(), FakeClock()).gnss_message == "GPS2_RAW"
