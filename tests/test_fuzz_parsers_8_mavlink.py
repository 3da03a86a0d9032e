"""Property-based fuzzing of the parsers (part 5; shared machinery in ``fuzz_common.py``, rule in docs/reliability.md):
inbound MAVLink (``MavlinkLink.poll``).
"""

from __future__ import annotations

import math
import os
import time

import pytest
from fuzz_common import (
    ACCEPTED,
    CASES,
    fuzz,
    outcome,
    quiet_opencv,  # noqa: F401  (module fixture)
    small_max_pixels,  # noqa: F401  (module fixture)
    time_limit,
    work_fixture,  # noqa: F401  (module fixture)
)
from hypothesis import example, given
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# ====================================================================================== 8. inbound MAVLink

AP_SYS, AP_COMP = 1, 1
MAV_KEY = bytes(range(101, 133))


@pytest.fixture(scope="module")
def mav_links(work):
    from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink

    key = work / "mav.key"
    key.write_bytes(MAV_KEY)
    os.chmod(key, 0o600)
    plain = MavlinkLink(MavlinkConfig(url="udpin:127.0.0.1:0", inbound_max_rate_hz=10000.0))
    signed = MavlinkLink(MavlinkConfig(url="udpin:127.0.0.1:0", signing_key_file=str(key), inbound_max_rate_hz=1e4))
    yield plain, signed
    plain.close()
    signed.close()


_SIGN_TS = [int((time.time() - 1_420_070_400) * 100_000)]  # MAVLink2 signing clock: 10 us since 2015


def _codec(sysid: int, compid: int, key: bytes | None = None):
    """A sender's MAVLink2 codec (signed with ``key``; each new codec continues the signing clock)."""
    from pymavlink.dialects.v20 import ardupilotmega as D

    mav = D.MAVLink(None, srcSystem=sysid, srcComponent=compid)
    if key is not None:
        _SIGN_TS[0] += 1000
        mav.signing.secret_key = key
        mav.signing.sign_outgoing = True
        mav.signing.link_id = 3
        mav.signing.timestamp = _SIGN_TS[0]
    return mav


f32 = st.floats(width=32)


@st.composite
def mav_packets(draw) -> bytes:
    sysid = draw(st.sampled_from([AP_SYS, AP_SYS, 2, 255]))
    compid = draw(st.sampled_from([AP_COMP, AP_COMP, 191]))
    mav = _codec(sysid, compid, MAV_KEY if draw(st.booleans()) else None)
    mav.seq = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["ATTITUDE", "VFR_HUD", "GLOBAL_POSITION_INT", "HEARTBEAT"]))
    i32, i16 = st.integers(-(2**31), 2**31 - 1), st.integers(-(2**15), 2**15 - 1)
    if kind == "ATTITUDE":
        msg = mav.attitude_encode(draw(st.integers(0, 2**32 - 1)), *(draw(f32) for _ in range(6)))
    elif kind == "VFR_HUD":
        msg = mav.vfr_hud_encode(draw(f32), draw(f32), draw(i16), draw(st.integers(0, 65535)), draw(f32), draw(f32))
    elif kind == "GLOBAL_POSITION_INT":
        msg = mav.global_position_int_encode(
            draw(st.integers(0, 2**32 - 1)),
            *(draw(i32) for _ in range(4)),
            *(draw(i16) for _ in range(3)),
            draw(st.integers(0, 65535)),
        )
    else:
        msg = mav.heartbeat_encode(6, 3, 0, 0, 4)
    return bytes(msg.pack(mav))


@st.composite
def mav_datagrams(draw) -> list[bytes]:
    """1..4 datagrams: valid packets (some concatenated), mutated, truncated or random bytes."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["valid", "multi", "flip", "cut", "bytes", "prefixed"]))
        if kind == "bytes":
            out.append(draw(st.binary(min_size=1, max_size=300)))
            continue
        pkt = b"".join(draw(st.lists(mav_packets(), min_size=1, max_size=3 if kind == "multi" else 1)))
        b = bytearray(pkt)
        if kind == "flip":
            for _ in range(draw(st.integers(1, 4))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut":
            del b[draw(st.integers(1, len(b) - 1)) :]
        elif kind == "prefixed":
            b = bytearray(draw(st.binary(max_size=20))) + b
        out.append(bytes(b))
    return out


def _mav_case(link, datagrams: list[bytes]) -> None:
    """Poll ``link`` once with ``datagrams`` as what its socket returns; every datagram must leave a trace."""
    before = link.stats
    link._read_chunks = lambda: [(d, ("127.0.0.1", 9)) for d in datagrams]
    n = outcome(MAV_PARSER, link.poll)
    assert isinstance(n, int) and 0 <= n <= sum(map(len, datagrams))
    ACCEPTED[MAV_PARSER] -= n == 0  # accepted: at least one message taken
    after = link.stats
    traces = sum(after[k] - before.get(k, 0) for k in after if not k.startswith(("sent_", "received_")))
    assert traces >= len(datagrams), (datagrams, before, after)
    h = link.heading_deg(max_age_s=1e9)
    assert h is None or (math.isfinite(h) and 0.0 <= h < 360.0)
    pos = link.position_prior(max_age_s=1e9)
    assert pos is None or (math.isfinite(pos.lat_deg) and math.isfinite(pos.lon_deg))


MAV_PARSER = "MAVLink inbound: MavlinkLink.poll"


ATTITUDE_YAW_MINUS_TINY = (  # yaw -2.5e-38 rad: degrees % 360.0 rounded to 360.0 (fixed: heading in [0, 360))
    b"\xfd\x10\x00\x00\x00\x01\x01\x1e\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x80\xd1\x08"
)


@fuzz(1000)
@given(datagrams=mav_datagrams(), signed=st.booleans())
@example(datagrams=[ATTITUDE_YAW_MINUS_TINY], signed=False)
def test_mavlink_poll_fuzzed_datagrams(mav_links, datagrams, signed):
    _mav_case(mav_links[1 if signed else 0], datagrams)


@fuzz(100)
@given(datagrams=mav_datagrams())
def test_mavlink_poll_real_udp(datagrams):
    """The same bytes through a real udpin socket (fewer cases: each waits for its datagrams to arrive)."""
    import socket

    from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    CASES[MAV_PARSER] += 1
    with time_limit(), MavlinkLink(MavlinkConfig(url=f"udpin:127.0.0.1:{port}", inbound_max_rate_hz=1e4)) as link:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for d in datagrams:
                tx.sendto(d, ("127.0.0.1", port))
        traces, end = 0, time.monotonic() + 2.0
        while traces < len(datagrams) and time.monotonic() < end:
            link.poll()  # nothing may raise
            traces = sum(v for k, v in link.stats.items() if not k.startswith(("sent_", "received_")))
            time.sleep(0.001)
        assert traces >= len(datagrams), link.stats
