"""Atomic outputs: the file gets the mode any new file of the process would (the umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

from sarloc.core.artifacts import atomic_save, atomic_write_json


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "a.json", {"x": 1})
        q = atomic_save(tmp_path / "b.bin", lambda t: t.write_bytes(b"1"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # readable by a service running as another user
        assert stat.S_IMODE(q.stat().st_mode) == 0o644
        os.umask(0o077)
        r = atomic_write_json(tmp_path / "c.json", {"x": 2})
        assert stat.S_IMODE(r.stat().st_mode) == 0o600  # a strict umask is respected
    finally:
        os.umask(old)
    assert os.umask(old) == old  # the umask is left as it was
