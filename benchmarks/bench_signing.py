"""Signing rejection rate: how many inbound MAVLink messages the daemon's link accepts, by kind of sender.

    python benchmarks/bench_signing.py --n 1000 --out runs/bench/signing.json

A :class:`sarloc.runtime.mavlink.MavlinkLink` with signing on listens on UDP; four pymavlink peers send ``--n``
ATTITUDE messages each: the autopilot with the right key, a peer with a wrong key, an unsigned peer, and a peer
with the right key but another system id. Replays of the autopilot's own signed packets are sent too. Prints and
writes the accepted / dropped counts per sender (a bounded send rate keeps the kernel from dropping datagrams).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/signing.json"))
    return ap.parse_args(argv)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(port: int, k, sysid=1):
    """A pymavlink sender to the link's port, signing with key ``k`` (None: unsigned)."""
    from pymavlink import mavutil
    from pymavlink.dialects.v20 import ardupilotmega as dialect

    c = mavutil.mavlink_connection(f"udpout:127.0.0.1:{port}", source_system=sysid, source_component=1)
    c.mav = dialect.MAVLink(c, srcSystem=sysid, srcComponent=1)
    if k is not None:
        c.setup_signing(k, sign_outgoing=True, allow_unsigned_callback=lambda m, i: False, link_id=1)
    return c


def _drain(link, seconds: float = 2.0) -> None:
    """Poll the link for ``seconds`` so that every datagram sent is read."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        link.poll()
        time.sleep(0.005)


def _changed(link, s0: dict) -> dict:
    """The link's counters that changed since the snapshot ``s0``, by how much."""
    return {k: link.stats[k] - s0.get(k, 0) for k in link.stats if link.stats[k] != s0.get(k, 0)}


def _send(link, name: str, c, n: int, replay_bufs: list) -> dict:
    """Send ``n`` ATTITUDE messages from one peer at a bounded rate; keep every 10th autopilot packet for the
    replays; returns the counters that changed."""
    s0 = dict(link.stats)
    for i in range(n):
        msg = c.mav.attitude_encode(i, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0)
        c.mav.send(msg)
        if name.startswith("autopilot") and i % 10 == 0:
            replay_bufs.append(msg.get_msgbuf())
        if i % 50 == 0:
            link.poll()
            time.sleep(0.002)
    _drain(link)
    return _changed(link, s0)


def _measure(n: int) -> tuple[dict, dict, dict]:
    """Run the link and the peers: ``(counts per sender, packets sent per sender, the link's stats before)``."""
    from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink

    key, other = os.urandom(32), os.urandom(32)
    with tempfile.TemporaryDirectory() as td:
        kf = Path(td) / "key"
        kf.write_bytes(key)
        kf.chmod(0o600)
        port = _free_udp_port()
        # no per-type rate limit here: this measures signing, not flood control
        link = MavlinkLink(
            MavlinkConfig(url=f"udpin:127.0.0.1:{port}", signing_key_file=str(kf), inbound_max_rate_hz=10000.0)
        )
        senders = {
            "autopilot, right key": _peer(port, key),
            "wrong key": _peer(port, other),
            "unsigned": _peer(port, None),
            "right key, other sysid": _peer(port, key, sysid=42),
        }
        before = dict(link.stats)
        counts = {}
        replay_bufs: list = []
        for name, c in senders.items():
            counts[name] = _send(link, name, c, n, replay_bufs)
        s0 = dict(link.stats)
        for buf in replay_bufs:
            senders["autopilot, right key"].write(buf)
        _drain(link)
        counts["replayed signed packets"] = _changed(link, s0)
        for c in senders.values():
            c.close()
        link.close()
    sent = {**{k: n for k in senders}, "replayed signed packets": len(replay_bufs)}
    return counts, sent, before


def _rows(counts: dict, sent: dict) -> list[dict]:
    rows = []
    for name, c in counts.items():
        acc = c.get("received_ATTITUDE", 0)
        rows.append(
            {
                "sender": name,
                "sent": sent[name],
                "accepted": acc,
                "dropped": {k: v for k, v in c.items() if k.startswith("dropped")},
            }
        )
    return rows


def main(argv=None) -> int:
    a = _parse_args(argv)
    counts, sent, before = _measure(a.n)
    rows = _rows(counts, sent)
    res = {"n": a.n, "rows": rows, "stats_before": before}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print("| sender | sent | accepted | dropped (counter: n) |\n|---|---|---|---|")
    for r in rows:
        d = ", ".join(f"{k}: {v}" for k, v in r["dropped"].items()) or "-"
        print(f"| {r['sender']} | {r['sent']} | {r['accepted']} | {d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
