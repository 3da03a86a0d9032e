"""MAVLink link tests: the sender thread, shutdown and late config checks.

Shared helpers in ``tests/mavlink_helpers.py``.
Everything runs on 127.0.0.1 with free ports (bound to port 0 first), so the file runs in parallel with others and
needs no autopilot. pymavlink peers get their own MAVLink2 codec so that mavutil's global dialect is left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time

import pytest
from mavlink_helpers import (
    collect,
    first,
    free_port,
    key_file,
    links_fixture,  # noqa: F401  (the links fixture)
    nav,
    pymav,
)
from pymavlink.dialects.v20 import ardupilotmega as D

from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkSender,
    load_signing_key,
)
from sarloc.runtime.types import NavState

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

    with pytest.raises(ConfigError, match=r"gps_rate_hz=1000.* is invalid"):
        MavlinkConfig(gps_rate_hz=10**400)
