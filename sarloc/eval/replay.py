"""``sarloc replay``: re-run a recorded session from its ``start`` record and compare the fixes (torch-free).

The replay reads the same source (a ``dir://`` folder or a strip file; network sources must have been recorded to
a folder first), with the same artifacts (their hashes are checked against the record) and configuration, without
MAVLink, and writes a new records file. Processing is deterministic (single-threaded ONNX Runtime, the strips' own
time stamps), so the fixes must match the recording; :func:`compare_fixes` says where they do not.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from sarloc.core.errors import ArtifactError, ConfigError, SarlocError

FIX_KEYS = ("strip_id", "t_s", "xy_m", "trusted", "confidence", "n_inliers", "n_windows", "accepted")

#: artifacts of the start record (``artifacts``: key -> sha256) checked against their files before the re-run:
#: key -> (what it is, the config field of its folder, its file name). The encoder and the refiner (their
#: manifests' hashes of the loaded models) are compared after the re-run, with the new start record.
ARTIFACT_FILES = {
    "pack_manifest": ("map pack manifest", "pack", "pack.json"),
    "verifier": ("verifier", "export", "verifier.json"),
    "shortlister": ("shortlister", "export", "shortlister.json"),
}
_ARTIFACT_NAMES = {"encoder": ("SAR encoder", "export", None), "refiner": ("refiner", "export", "refiner.onnx")}
_FIX = "replay needs the recorded artifacts: restore them, or record a new session with `sarloc run`"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete JSON records of a records file (a truncated last line is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        raise SarlocError(f"records file {p} not found")
    for line in p.read_bytes().splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def _close(u: Any, v: Any, tol: float) -> bool:
    """Equal, with numbers compared within ``tol`` (NaN equals NaN) and lists element by element."""
    num = (int, float)
    if isinstance(u, num) and isinstance(v, num) and not isinstance(u, bool) and not isinstance(v, bool):
        if u == v:
            return True
        try:
            return math.isclose(u, v, rel_tol=tol, abs_tol=tol) or (math.isnan(u) and math.isnan(v))
        except OverflowError:  # an integer beyond the float range, unequal to the other value
            return False
    if isinstance(u, list) and isinstance(v, list):
        return len(u) == len(v) and all(_close(p, q, tol) for p, q in zip(u, v, strict=True))
    return u == v


def compare_fixes(a: list[dict], b: list[dict], tol: float = 1e-6) -> list[str]:
    """Differences between two lists of fix records (empty when they agree)."""
    fa = [r for r in a if r.get("type") == "fix"]
    fb = [r for r in b if r.get("type") == "fix"]
    diffs = []
    if len(fa) != len(fb):
        diffs.append(f"{len(fa)} fixes recorded, {len(fb)} replayed")
    for x, y in zip(fa, fb, strict=False):
        for k in FIX_KEYS:
            u, v = x.get(k), y.get(k)
            if not _close(u, v, tol):
                diffs.append(f"strip {str(x.get('strip_id'))[:40]!r}: {k} {u!r:.80} != {v!r:.80}")
    return diffs


def session_config(recs: list[dict[str, Any]], records: str | Path, out: str | Path) -> Any:
    """The :class:`~sarloc.runtime.daemon.RunConfig` that re-runs the session of ``recs`` into ``out``.

    Raises:
        SarlocError: no start record, or its config is malformed (one line naming the records file).
    """
    from sarloc.runtime.daemon import load_run_config

    start = next((r for r in recs if r.get("type") == "start"), None)
    if start is None:
        raise SarlocError(f"{records} has no start record; it is not a sarloc run record")
    c = start.get("config")
    if not isinstance(c, dict):
        raise SarlocError(f"{records}: the start record has no config object; it is not a sarloc run record")
    c = dict(c)
    if isinstance(c.get("source"), str) and c["source"].startswith(("udp://", "tcp://")):
        raise SarlocError("a network source cannot be replayed directly; record its strips to a folder (dir://)")
    c.update(out=str(out), follow=False, resume=False, mavlink=False, max_strips=None)
    sub = {k: c.pop(k, {}) for k in ("localizer", "fusion")}
    c.pop("mavlink_opts", None)
    if not all(isinstance(d, dict) for d in sub.values()):
        raise SarlocError(f"{records}: the start record's localizer / fusion settings are not objects")
    try:
        return load_run_config(None, **c, **{f"{t}.{k}": v for t, d in sub.items() for k, v in d.items()})
    except ConfigError as e:
        raise SarlocError(f"{records}: the recorded config is malformed ({e})") from None


def _short(sha: Any) -> str:
    return str(sha)[:12] if isinstance(sha, str) else "none (absent)"


def _artifact_error(key: str, recorded: dict[str, Any], now: Any, cfg: Any, records: str | Path) -> str | None:
    """The one-line refusal when artifact ``key`` is not the recorded one (None when it is)."""
    what, folder, name = {**ARTIFACT_FILES, **_ARTIFACT_NAMES}.get(key, (key, "export", None))
    where = Path(getattr(cfg, folder))
    shown = where / name if name else where
    if key not in recorded:
        return (
            f"{records} holds no hash of the {what} ({shown}): recorded by an older sarloc, so replay cannot tell "
            f"whether it changed; record a new session with `sarloc run`"
        )
    if recorded[key] != now:
        return (
            f"{what} {shown} changed since the recording (sha256 {_short(recorded[key])} recorded, {_short(now)} "
            f"now); {_FIX}"
        )
    return None


def check_artifact_files(start: dict[str, Any], cfg: Any, records: str | Path) -> None:
    """Refuse a session whose map pack manifest, verifier or shortlister file is not the recorded one.

    Raises:
        ArtifactError: one line naming the file and the fix (also when the recording names no hash of it).
    """
    from sarloc.core.artifacts import sha256_file

    recorded = start.get("artifacts")
    if not isinstance(recorded, dict):
        raise SarlocError(f"{records}: the start record has no artifacts object; it is not a sarloc run record")
    for key, (_, folder, name) in ARTIFACT_FILES.items():
        p = Path(getattr(cfg, folder)) / name
        try:
            now = sha256_file(p) if p.is_file() else None
        except OSError:  # unreadable: the run itself says why
            now = None
        msg = _artifact_error(key, recorded, now, cfg, records)
        if msg:
            raise ArtifactError(msg)


def replay(records: str | Path, out: str | Path, compare: bool = True) -> dict[str, Any]:
    """Re-run the session of ``records`` into ``out``; returns counters, and with ``compare`` the differences.

    Raises:
        ArtifactError: an artifact (map pack manifest, verifier, shortlister, encoder or refiner) is not the one
            recorded; the files are checked before the re-run, the loaded models' hashes after it.
    """
    from sarloc.runtime.daemon import RunConfig, run

    recs = read_records(records)
    cfg = session_config(recs, records, out)
    if (Path(out) / "records.jsonl").exists():
        raise SarlocError(f"{Path(out) / 'records.jsonl'} exists; replay into an empty folder")
    assert isinstance(cfg, RunConfig)
    start = next(r for r in recs if r.get("type") == "start")
    check_artifact_files(start, cfg, records)
    stats = run(dataclasses.replace(cfg), install_signals=False)
    new = read_records(Path(out) / "records.jsonl")
    new_start = next(r for r in new if r.get("type") == "start")
    now = new_start.get("artifacts") or {}
    for key in now:
        msg = _artifact_error(key, start["artifacts"], now[key], cfg, records)
        if msg:
            raise ArtifactError(msg)
    res: dict[str, Any] = {"strips": stats["strips"], "fixes": stats["fixes"]}
    if compare:
        diffs = compare_fixes(recs, new)
        res.update(identical=not diffs, differences=diffs[:20])
    return res


__all__ = ["ARTIFACT_FILES", "check_artifact_files", "compare_fixes", "read_records", "replay", "session_config"]
