"""MAVLink link tests: MAVLink2 signing (key files, outbound signatures, inbound verification).

Shared helpers in ``tests/mavlink_helpers.py``.
Everything runs on 127.0.0.1 with free ports (bound to port 0 first), so the file runs in parallel with others and
needs no autopilot. pymavlink peers get their own MAVLink2 codec so that mavutil's global dialect is left alone.
"""

from __future__ import annotations

import logging
import math
import time

import pytest
from mavlink_helpers import (
    KEY,
    OTHER_KEY,
    FakeClock,
    collect,
    first,
    free_port,
    key_file,
    links_fixture,  # noqa: F401  (the links fixture)
    poll_until,
    pymav,
    signature_timestamp,
    signing_units,
)

from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkLink,
    load_signing_key,
)

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
