"""Shared helpers of the MAVLink link tests (``tests/runtime/test_mavlink_*.py``): keys, free ports, pymavlink
peers, polling, and the ``links`` fixture (import ``links_fixture`` into a test module)."""

from __future__ import annotations

import socket
import time

import pytest
from pymavlink import mavutil
from pymavlink.dialects.v20 import ardupilotmega as D

import sarloc.runtime.mavlink as mv
from sarloc.runtime.mavlink import (
    MavlinkConfig,
    MavlinkLink,
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


@pytest.fixture(name="links")
def links_fixture():
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
