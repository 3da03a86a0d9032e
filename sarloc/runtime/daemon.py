"""The onboard daemon (torch-free): strips in, positions at the current time out (JSONL records and MAVLink).

``sarloc run --config onboard.toml`` (every option also a flag) builds a :class:`RunConfig` and calls :func:`run`.

Data path, per block of rows as it arrives: windows (north-up, on the pack grid) ->
:class:`~sarloc.runtime.localizer.Localizer` -> one JSONL ``window`` record each -> the navigation filter
(:mod:`sarloc.runtime.navfilter`): a trusted window enters at its acquisition time if it agrees with the track; before
the filter has a position, a sliding consensus over the recent windows (across strip boundaries,
:mod:`sarloc.runtime.fusion`) initialises it. At a strip's last block, the strip's own consensus is recorded as a
``fix`` record (the unit of ``sarloc report`` and ``sarloc replay``). A :class:`~sarloc.runtime.mavlink.MavlinkSender`
thread sends the filter's state predicted to *now* at ``gps_rate_hz`` (default 10 Hz), between fixes too, with
accuracies from the filter covariance; it sends no-fix while the filter has no position or its one-sigma error is
beyond ``[nav] max_sigma_m``, and once more on exit.

Motion between fixes (``motion``): the autopilot's heading and airspeed (``airspeed``: ATTITUDE + VFR_HUD,
independent of the positions sarloc sends; the filter estimates the wind), the autopilot's ground velocity
(``velocity``: only with an independent velocity source such as optical flow; without GNSS and without one it
is built from sarloc's own positions and the loop drifts), the strips' metadata (``strip``:
heading and along-track speed), or ``auto`` (airspeed when the autopilot reports it, else the strips).

Clock (``clock``): window times come from the strips' ``t0_s`` and row rate. ``unix``: they are UNIX times from a
clock synchronised with this computer's (checked against the autopilot's SYSTEM_TIME when it is heard; a difference
above ``max_clock_offset_s`` is logged); ``autopilot``: they are on the autopilot's UNIX clock (SYSTEM_TIME), which
"now" follows (a simulator running faster than real time); ``data``: recorded data replayed, "now" is the newest
acquisition time seen, advanced by the wall clock since; ``auto``: ``unix`` when the first strip is within
5 minutes of this computer's clock, else ``data``.

Records (one JSON object per line, flushed at once, fsync'd at every strip end): ``start`` (config, artifact
hashes), ``window``, ``fix``, ``nav`` (the filter's state about once a second and at every initialisation),
``error``, ``stop`` (counters, fix availability). Every line is written with a single ``write`` call in append mode;
a reader (:func:`sarloc.eval.report.load_fixes`) tolerates a truncated last line after a crash.

Stopping: SIGTERM / SIGINT stop the source at once; what was read is processed, the current strip's fix is written
and a last no-fix goes to the autopilot (a second signal stops at once). Restarting with ``resume = true`` skips
strips that already have a ``fix`` record in the output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from sarloc.core.config import build_dataclass
from sarloc.core.errors import ConfigError, SarlocError, brief
from sarloc.runtime.fusion import FusionConfig, SlidingWindows, strip_consensus
from sarloc.runtime.localizer import Localizer, LocalizerConfig
from sarloc.runtime.navfilter import NavConfig, NavFilter
from sarloc.runtime.types import Fix, NavState, WindowFix, heading_vectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Daemon settings (TOML keys = field names; ``[fusion]``, ``[localizer]`` and ``[mavlink]`` tables).

    Attributes:
        source: strip source URL (``dir://FOLDER``, a strip file, ``udp://HOST:PORT``, ``tcp://HOST:PORT``).
        export: export folder (SAR encoder ONNX + manifests; refiner.onnx and verifier.json beside them).
        pack: map pack folder.
        out: output folder (``records.jsonl``).
        backend: "auto" (TensorRT engine when present and usable, else ONNX Runtime), "ort" or "trt".
        precision: encoder precision ("fp32", "int8", "fp16").
        stride_px: spacing of window centres, map pixels on the ground.
        prior_radius_m: search within this radius of the predicted track or the INS prior (None: the whole map).
        follow: keep watching a ``dir://`` source for new strips (False: process what is there, then stop).
        resume: skip strips that already have a fix in ``out/records.jsonl``.
        max_strips: stop after this many strips (None: run until the source ends or a signal).
        mavlink: enable the MAVLink sender (TOML: ``enabled`` in the ``[mavlink]`` table, whose other keys are
            :class:`~sarloc.runtime.mavlink.MavlinkConfig` fields, kept in ``mavlink_opts``).
        record_windows: write one ``window`` record per window (else only fixes).
        queue_blocks: network sources: blocks buffered while processing is behind; beyond, the oldest are dropped
            (counted: ``blocks_dropped``).
        source_idle_timeout_s: network and ``dir://`` sources: stop after this long without data (None: never).
        verify_pack: check the pack's sha256 at start (reads every byte once).
        clock: how strip times relate to "now": ``auto``, ``unix``, ``autopilot`` or ``data`` (module docstring).
        max_clock_offset_s: ``unix`` clock: a larger difference from the autopilot's SYSTEM_TIME is logged.
        motion: the motion input between fixes: ``auto``, ``airspeed``, ``velocity`` or ``strip`` (module docstring).
        field_elevation_m: altitude above mean sea level of the take-off point; when set, the altitude sent is this
            plus the autopilot's own height above home (GLOBAL_POSITION_INT.relative_alt), else no altitude is sent
            (the autopilot then needs ``BARO_FIELD_ELV``, see docs/mavlink.md).
        nav: navigation filter settings (``[nav]`` table, :class:`~sarloc.runtime.navfilter.NavConfig`).
    """

    source: str
    export: str
    pack: str
    out: str = "sarloc_run"
    backend: str = "ort"
    precision: str = "fp32"
    stride_px: float = 32.0
    prior_radius_m: float | None = None
    follow: bool = True
    resume: bool = False
    max_strips: int | None = None
    mavlink: bool = False
    record_windows: bool = True
    queue_blocks: int = 256
    source_idle_timeout_s: float | None = None
    verify_pack: bool = True
    clock: str = "auto"
    max_clock_offset_s: float = 0.5
    motion: str = "auto"
    field_elevation_m: float | None = None
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    nav: NavConfig = field(default_factory=NavConfig)
    mavlink_opts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SUB = {"localizer": LocalizerConfig, "fusion": FusionConfig, "nav": NavConfig}
_TABLES = ("localizer", "fusion", "nav", "mavlink")
CLOCKS = ("auto", "unix", "autopilot", "data")
#: one-sigma of the autopilot's wind estimate when it starts the filter's wind (from GNSS and airspeed until the
#: denial; partly from sarloc's own positions after it)
WIND_PRIOR_SIGMA_MPS = 1.5
MOTIONS = ("auto", "airspeed", "velocity", "strip")


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A :class:`RunConfig` from a TOML file (optional) plus overrides (flags; None values are ignored).

    Raises:
        ConfigError: unreadable or malformed TOML, unknown keys, wrong types, missing required keys.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config {p} not found") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # TOMLDecodeError is a ValueError
            msg = brief(e)
            raise ConfigError(f"config {p} is not valid TOML ({msg}); fix the file") from None
    raw = {k: v for k, v in raw.items()}
    for k in _TABLES:
        if k in raw and not isinstance(raw[k], dict):
            raise ConfigError(f"{path or 'flags'}: '{k}' must be a table ([{k}]), got {type(raw[k]).__name__}")
    tables = {k: raw.pop(k) for k in _TABLES if k in raw}
    for k, v in overrides.items():
        if v is None:
            continue
        if "." in k:
            t, key = k.split(".", 1)
            tables.setdefault(t, {})[key] = v
        else:
            raw[k] = v
    where = str(path or "flags")
    for key in ("source", "export", "pack"):
        if not raw.get(key):
            raise ConfigError(f"{where}: '{key}' is required (TOML key or --{key})")
    sub = {name: build_dataclass(cls, tables.get(name, {}), f"{where} [{name}]") for name, cls in _SUB.items()}
    mav = dict(tables.get("mavlink", {}))
    if "enabled" in mav:
        raw["mavlink"] = bool(mav.pop("enabled"))
    if mav:
        from sarloc.runtime.mavlink import MavlinkConfig

        build_dataclass(MavlinkConfig, mav, f"{where} [mavlink]")  # validate now, not mid-flight
    cfg = build_dataclass(RunConfig, {**raw, **sub, "mavlink_opts": mav}, where)
    if cfg.backend not in ("auto", "ort", "trt"):
        raise ConfigError(f"{where}: backend must be auto, ort or trt, got {cfg.backend!r}")
    if cfg.stride_px <= 0 or (cfg.prior_radius_m is not None and cfg.prior_radius_m <= 0):
        raise ConfigError(f"{where}: stride_px and prior_radius_m must be > 0")
    if cfg.queue_blocks < 1 or (cfg.max_strips is not None and cfg.max_strips < 1):
        raise ConfigError(f"{where}: queue_blocks and max_strips must be >= 1")
    if cfg.precision not in ("fp32", "int8", "fp16"):
        raise ConfigError(f"{where}: precision must be fp32, int8 or fp16, got {cfg.precision!r}")
    lc, fc = cfg.localizer, cfg.fusion
    if lc.k < 1 or lc.pool < 0 or lc.batch < 1 or lc.search_px < 1 or not 0.0 <= lc.threshold <= 1.0:
        raise ConfigError(f"{where} [localizer]: k, batch, search_px >= 1, pool >= 0, 0 <= threshold <= 1")
    if fc.gate_m <= 0 or fc.min_inliers < 1 or fc.horizon_s <= 0 or fc.max_windows < 1 or fc.window_sigma_scale <= 0:
        raise ConfigError(f"{where} [fusion]: gate_m, horizon_s, window_sigma_scale > 0; min_inliers, max_windows >= 1")
    if cfg.clock not in CLOCKS:
        raise ConfigError(f"{where}: clock must be one of {', '.join(CLOCKS)}, got {cfg.clock!r}")
    if cfg.motion not in MOTIONS:
        raise ConfigError(f"{where}: motion must be one of {', '.join(MOTIONS)}, got {cfg.motion!r}")
    if not cfg.max_clock_offset_s > 0:
        raise ConfigError(f"{where}: max_clock_offset_s must be > 0, got {cfg.max_clock_offset_s!r}")
    return cfg


class Recorder:
    """Append-only JSONL records, one ``write`` per line, flushed; failures counted, never raised (disk full)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.errors = 0
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False, default=_json_default) + "\n").encode()
        try:
            os.write(self.fd, line)
            self.lines += 1
        except OSError as e:
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                logger.error("cannot write %s (%s); %d records lost so far, still running", self.path, e, self.errors)

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            self.errors += 1

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def done_strips(path: Path) -> set[str]:
    """Strip ids that already have a ``fix`` record in a records file (for ``resume``)."""
    out: set[str] = set()
    if not path.is_file():
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                continue
            if isinstance(r, dict) and r.get("type") == "fix" and r.get("strip_id"):
                out.add(str(r["strip_id"]))
    return out


class Prefetcher:
    """Reads a network source on its own thread into a bounded queue; when full, the oldest blocks are dropped.

    Network strips are ephemeral: if processing falls behind a burst, the kernel would drop datagrams silently.
    Here the newest data wins (the autopilot wants the current position), drops are counted and logged, and the
    window stream skips the windows that needed the missing rows.
    """

    def __init__(self, source, max_blocks: int = 256) -> None:
        import collections

        self.source = source
        self.q: collections.deque = collections.deque()
        self.max_blocks = int(max_blocks)
        self.dropped = 0
        self.done = threading.Event()
        self.cv = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sarloc-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for block in self.source:
                with self.cv:
                    self.q.append(block)
                    while len(self.q) > self.max_blocks:
                        self.q.popleft()
                        self.dropped += 1
                        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                            logger.warning(
                                "processing behind the stream: %d blocks dropped (oldest first)", self.dropped
                            )
                    self.cv.notify()
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()
            with self.cv:
                self.cv.notify()

    def __iter__(self):
        while True:
            with self.cv:
                while not self.q and not self.done.is_set():
                    self.cv.wait(0.2)
                if self.q:
                    block = self.q.popleft()
                elif self.error is not None:
                    raise self.error
                else:
                    return
            yield block

    def close(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop:
            stop()
        close = getattr(self.source, "close", None)
        if close:
            close()
        self.thread.join(timeout=5.0)


class ClockMap:
    """Maps this computer's wall clock to the data clock (see ``clock`` in the module docstring). Thread-safe."""

    def __init__(self, mode: str, max_offset_s: float = 0.5) -> None:
        self.mode = mode
        self.max_offset_s = max_offset_s
        self._lock = threading.Lock()
        self._data_s: float | None = None  # data mode: newest acquisition time ...
        self._data_wall_s = 0.0  # ... and the wall time it arrived
        self._last_now = -math.inf
        self._ap: list[tuple[float, float]] = []  # (wall_s, autopilot unix s) samples
        self.offset_s: float | None = None  # autopilot - wall, latest estimate
        self.warned = False

    def observe_data(self, t_s: float, wall_s: float) -> None:
        """A block whose newest row was acquired at ``t_s`` arrived at ``wall_s``; ``auto`` decides here."""
        with self._lock:
            if self.mode == "auto":
                self.mode = "unix" if abs(t_s - wall_s) < 300.0 else "data"
                if self.mode == "data":
                    logger.warning(
                        "strip times are %s this computer's clock: treating them as recorded data (clock = data); "
                        "set clock = unix or autopilot for a live system",
                        _duration(t_s - wall_s),
                    )
            if self._data_s is None or t_s >= self._data_s:
                self._data_s, self._data_wall_s = t_s, wall_s

    def observe_autopilot(self, wall_s: float, unix_s: float) -> None:
        """One SYSTEM_TIME sample: the autopilot's UNIX time ``unix_s`` received at ``wall_s``."""
        with self._lock:
            if self._ap and wall_s <= self._ap[-1][0]:
                return
            if self._ap and abs((unix_s - wall_s) - (self._ap[-1][1] - self._ap[-1][0])) > 60.0:
                logger.warning("autopilot clock jumped by %.1f s; restarting the clock map", unix_s - self._ap[-1][1])
                self._ap.clear()
            self._ap.append((wall_s, unix_s))
            del self._ap[:-30]
            self.offset_s = unix_s - wall_s

    def _autopilot_now(self, wall_s: float) -> float | None:
        if not self._ap:
            return None
        if len(self._ap) < 3:
            w, u = self._ap[-1]
            return u + (wall_s - w)
        a = np.asarray(self._ap, float)
        w0, u0 = a[-1]
        rate = np.polyfit(a[:, 0] - w0, a[:, 1] - u0, 1)[0]  # a simulator may run faster than real time
        rate = float(np.clip(rate, 0.05, 100.0))
        return float(u0 + rate * (wall_s - w0))

    def now(self, wall_s: float) -> float | None:
        """The data-clock time at wall time ``wall_s`` (None while unknown: ``data`` or ``auto`` before any
        strip, ``autopilot`` before any SYSTEM_TIME). Never goes backwards."""
        with self._lock:
            mode = self.mode
            if mode == "unix":
                t = wall_s
            elif mode == "autopilot":
                t = self._autopilot_now(wall_s)
            elif mode == "data" and self._data_s is not None:
                t = self._data_s + max(0.0, wall_s - self._data_wall_s)
            else:
                t = None
            if t is None:
                return None
            self._last_now = max(self._last_now, t)
            return self._last_now


class Daemon:
    """The processing loop (see the module docstring); :func:`run` is the usual entry point."""

    def __init__(self, cfg: RunConfig, localizer: Localizer | None = None) -> None:
        from sarloc.runtime.windows import WindowStream

        self.cfg = cfg
        self.loc = localizer or Localizer.from_paths(
            cfg.export,
            cfg.pack,
            cfg.localizer,
            backend=cfg.backend,
            precision=cfg.precision,
            verify_pack=cfg.verify_pack,
        )
        gsd = self.loc.grid.gsd_m
        self.stream = WindowStream(map_gsd_m=gsd, window_px=self.loc.window_px, stride_px=cfg.stride_px)
        self.nav = NavFilter(cfg.nav)
        self.recent = SlidingWindows(cfg.fusion)
        self.clock = ClockMap(cfg.clock, cfg.max_clock_offset_s)
        self.out = Path(cfg.out)
        self.records_path = self.out / "records.jsonl"
        self.skip = done_strips(self.records_path) if cfg.resume else set()
        self.rec = Recorder(self.records_path)
        self.stop_requested = threading.Event()
        self.fatal: str | None = None
        self.stats: dict[str, Any] = {
            "strips": 0,
            "windows": 0,
            "fixes": 0,
            "trusted_fixes": 0,
            "accepted_fixes": 0,
            "windows_applied": 0,
            "windows_gated": 0,
            "strips_skipped": 0,
            "errors": 0,
        }
        self._out_stats = {"ticks": 0, "valid_ticks": 0, "ticks_since_first_valid": 0}
        self._lock = threading.Lock()
        self._to_lonlat = None
        self._grid_from_true_deg = 0.0  # grid heading = true heading + this (meridian convergence)
        crs = self.loc.pack.metric_crs
        if crs is not None:
            import pyproj

            tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            self._to_lonlat = lambda x, y: tuple(float(v) for v in tr.transform(x, y))
            self._grid_from_true_deg = _grid_convergence_deg(crs, self.loc.pack)
        self.link = None
        self.sender = None
        self._source: Any = None
        self._last_motion_rx: float | None = None
        self._last_nav_record = -math.inf
        self._last_ap_clock: float | None = None

    # ------------------------------------------------------------------------------------------ MAVLink
    def _feed_autopilot(self, wall_s: float) -> None:
        """Motion input and clock samples from the autopilot (called on every output tick, under the lock)."""
        link = self.link
        if link is None:
            return
        ck = link.autopilot_clock()
        if ck is not None and ck.time_unix_s is not None and ck.rx_wall_s != self._last_ap_clock:
            self._last_ap_clock = ck.rx_wall_s
            self.clock.observe_autopilot(ck.rx_wall_s, ck.time_unix_s)
            off = ck.time_unix_s - ck.rx_wall_s
            if self.clock.mode == "unix" and abs(off) > self.cfg.max_clock_offset_s and not self.clock.warned:
                self.clock.warned = True
                logger.warning(
                    "the autopilot's clock differs from this computer's by %.2f s (> max_clock_offset_s %.2f): "
                    "synchronise the clocks (e.g. chrony) or set clock = autopilot",
                    off,
                    self.cfg.max_clock_offset_s,
                )
        motion = self.cfg.motion
        if motion not in ("auto", "airspeed", "velocity"):
            return
        mono_now = time.monotonic()
        sample = None
        if motion in ("auto", "airspeed"):
            att, asp = link.attitude(max_age_s=1.0), link.airspeed_mps(max_age_s=1.0)
            if att is not None and asp is not None and asp.mps >= 3.0:
                rx = max(att.rx_mono_s, asp.rx_mono_s)
                psi = math.radians(att.yaw_deg + self._grid_from_true_deg)
                pos = link.position_prior(max_age_s=5.0)
                tas = asp.mps * eas_to_tas(pos.alt_m if pos is not None else 0.0)
                sample = (rx, "air", (tas * math.sin(psi), tas * math.cos(psi)))
        if motion == "velocity":
            pos = link.position_prior(max_age_s=1.0)
            if pos is not None:
                vn, ve = pos.vel_ned_mps[0], pos.vel_ned_mps[1]
                g = math.radians(self._grid_from_true_deg)  # rotate (east, north) true -> grid
                v = (ve * math.cos(g) + vn * math.sin(g), -ve * math.sin(g) + vn * math.cos(g))
                sample = (pos.rx_mono_s, "ground", v)
        if sample is None or sample[0] == self._last_motion_rx:
            return
        self._last_motion_rx = sample[0]
        t = self.clock.now(wall_s - (mono_now - sample[0]))
        if t is not None:
            self.nav.add_motion(t, sample[1], sample[2])

    def _wind_prior(self) -> tuple[tuple[float, float], float] | None:
        """The autopilot's wind estimate (grid frame) as the filter's starting wind, while it is fresh."""
        w = self.link.wind(max_age_s=5.0) if self.link is not None else None
        if w is None:
            return None
        g = math.radians(self._grid_from_true_deg)  # (east, north) true -> grid
        e, n = w.east_mps, w.north_mps
        return (e * math.cos(g) + n * math.sin(g), -e * math.sin(g) + n * math.cos(g)), WIND_PRIOR_SIGMA_MPS

    def nav_state(self, now_s: float) -> NavState:
        """The filter's state predicted to wall time ``now_s`` (UNIX) as a :class:`NavState` for the sender."""
        with self._lock:
            self._feed_autopilot(now_s)
            t = self.clock.now(now_s)
            est = self.nav.estimate(t) if t is not None else None
            self._out_stats["ticks"] += 1
            valid = est is not None and est.valid and self._to_lonlat is not None
            if valid:
                self._out_stats["valid_ticks"] += 1
            if self._out_stats["valid_ticks"]:
                self._out_stats["ticks_since_first_valid"] += 1
        if est is not None and now_s - self._last_nav_record >= 1.0:
            self._last_nav_record = now_s
            self.rec.write({"type": "nav", "wall_s": now_s, **_est_record(est)})
        if not valid:
            kw = {}
            if est is not None:
                kw = {"horiz_accuracy_m": est.sigma_h_m, "speed_accuracy_mps": est.sigma_v_mps}
            return NavState(now_s, False, **kw)
        lon, lat = self._to_lonlat(*est.xy_m)
        ve, vn = est.vel_mps
        g = math.radians(self._grid_from_true_deg)  # grid (east, north) -> true
        ve_t, vn_t = ve * math.cos(g) - vn * math.sin(g), ve * math.sin(g) + vn * math.cos(g)
        alt, vacc, vd = None, None, 0.0
        if self.cfg.field_elevation_m is not None and self.link is not None:
            pos = self.link.position_prior(max_age_s=1.0)
            if pos is not None:
                alt, vacc, vd = self.cfg.field_elevation_m + pos.relative_alt_m, 5.0, pos.vel_ned_mps[2]
        return NavState(
            now_s,
            True,
            float(lat),
            float(lon),
            alt,
            (vn_t, ve_t, vd),
            est.sigma_h_m,
            est.sigma_v_mps,
            None,  # no independent heading: yaw is not sent (course over ground is not a heading)
            vert_accuracy_m=vacc,
        )

    def _start_mavlink(self) -> None:
        if not self.cfg.mavlink:
            return
        from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink, MavlinkSender

        self.link = MavlinkLink(MavlinkConfig(**self.cfg.mavlink_opts))
        self.sender = MavlinkSender(self.link, self.nav_state)
        self.sender.start()
        threading.Thread(target=self._watch_link, name="sarloc-link-watch", daemon=True).start()

    def _watch_link(self) -> None:
        """Stops the daemon when the link is unusable and ``require_autopilot_s`` says that is fatal."""
        while not self.stop_requested.wait(0.5):
            link = self.link
            reason = link.fatal_reason() if link is not None else None
            if reason:
                self.fatal = reason
                logger.error("%s", reason)
                self.request_stop()
                return

    def _heading(self, meta) -> float | None:
        if meta.heading_deg is not None:
            return None  # the stream uses the metadata
        if self.link is not None:
            h = self.link.heading_deg(max_age_s=2.0)
            return None if h is None else (h + self._grid_from_true_deg) % 360.0
        return None

    # ------------------------------------------------------------------------------------------ per block
    def _prior(self, meta, t_s: float) -> tuple[tuple[float, float] | None, float | None]:
        r = self.cfg.prior_radius_m
        if r is None:
            return None, None
        with self._lock:
            st = self.nav.state(t_s)
        if st is not None:
            x, p = st
            sig = float(np.sqrt(max(np.linalg.eigvalsh(p[:2, :2]).max(), 0.0)))
            return (float(x[0]), float(x[1])), max(r, 3 * sig)
        if meta.prior_xy_m is not None or meta.prior_lonlat_deg is not None:
            xy = meta.prior_xy_m or self.loc.pack.to_metric(*meta.prior_lonlat_deg)
            return (float(xy[0]), float(xy[1])), max(r, 3 * (meta.prior_sigma_m or 0.0))
        return None, None

    def _strip_motion(self, block, heading: float | None) -> None:
        """The strip metadata's ground velocity as a motion input (``motion`` = strip, or auto without airspeed)."""
        if heading is None or self.cfg.motion not in ("strip", "auto"):
            return
        if self.cfg.motion == "auto" and self.link is not None and self.link.airspeed_mps(max_age_s=2.0):
            return
        fwd, _ = heading_vectors(heading)
        v = fwd * block.meta.speed_mps
        rows = block.pixels.shape[0]
        with self._lock:
            for r in (block.row0, block.row0 + rows - 1):
                self.nav.add_motion(float(block.meta.row_time_s(r)), "ground", (float(v[0]), float(v[1])))

    def _windows(self, batch) -> list[WindowFix]:
        meta = batch.meta
        t_mid = float(np.mean(batch.t_s)) if len(batch) else meta.t0_s
        prior, radius = self._prior(meta, t_mid)
        res = self.loc.localize(batch.windows, prior, radius)
        xy = np.array([r.xy_m if r.xy_m is not None else (np.nan, np.nan) for r in res], float)
        veh = batch.vehicle_xy_m(xy)
        fixes = []
        for i, r in enumerate(res):
            v = None if r.xy_m is None else (float(veh[i, 0]), float(veh[i, 1]))
            fixes.append(
                WindowFix(
                    batch.strip_id,
                    int(batch.index[i]),
                    (float(batch.centres_px[i, 0]), float(batch.centres_px[i, 1])),
                    float(batch.t_s[i]),
                    r.xy_m,
                    v,
                    r.score,
                    r.confidence,
                    r.sigma_m,
                    r.trusted,
                    {k: round(val, 3) for k, val in r.stage_ms.items()},
                )
            )
        verdicts = self._fuse(fixes)
        if self.cfg.record_windows:
            for wf, r, verdict in zip(fixes, res, verdicts, strict=True):
                self.rec.write(
                    {
                        "type": "window",
                        **dataclasses.asdict(wf),
                        "prior_radius_m": radius,
                        "candidates": r.candidates,
                        "nav": verdict,
                        "wall_s": time.time(),
                    }
                )
        self.stats["windows"] += len(res)
        return fixes

    def _fuse(self, windows: list[WindowFix]) -> list[str]:
        """Trusted windows into the navigation filter at their acquisition times; the sliding consensus
        initialises (and, on persistent disagreement, re-initialises) it. Returns a verdict per window."""
        wall = time.time()
        verdicts = []
        with self._lock:
            now = self.clock.now(wall)
            if now is None:
                return ["no clock"] * len(windows)
            gated = False
            scale = self.cfg.fusion.window_sigma_scale
            for w in windows:
                if w.vehicle_xy_m is None or not w.trusted:
                    verdicts.append("untrusted")
                    continue
                ok, why = self.nav.add_fix(w.t_s, w.vehicle_xy_m, w.sigma_m * scale, now)
                self.stats["windows_applied"] += int(ok)
                self.stats["windows_gated"] += int(why.startswith("gated"))
                gated |= why.startswith("gated")
                verdicts.append(why)
            self.recent.add(windows)
            if self.recent.windows and (gated or not self.nav.initialised):
                t_ref = self.recent.windows[-1].t_s
                c = strip_consensus(
                    self.recent.windows,
                    t_ref,
                    None,
                    self.cfg.fusion,
                    "sliding",
                    min_separation_m=self.loc.tile_m,
                    displacement=self.nav.displacement_m,
                )
                if c.trusted:
                    sigma = max(c.sigma_h_m, 1.0) * scale
                    changed, why = self.nav.add_consensus(c.t_s, c.xy_m, sigma, now, self._wind_prior())
                    if changed:
                        est = self.nav.estimate(now)
                        logger.info("navigation: %s (%s)", why, c.reason)
                        self.rec.write(
                            {"type": "nav", "event": why, "consensus": c.reason, "wall_s": wall, **_est_record(est)}
                        )
                        for i, w in enumerate(windows):
                            if w.vehicle_xy_m is not None and w.trusted and verdicts[i] != "applied":
                                verdicts[i] = f"consensus: {why}"
        return verdicts

    def _fix(self, meta, windows: list[WindowFix], heading: float | None) -> Fix:
        """The strip's own consensus, recorded as its ``fix`` (the unit of ``sarloc report`` and ``replay``)."""
        t_ref = float(np.mean([w.t_s for w in windows])) if windows else meta.t0_s
        vel = None
        if heading is not None:
            fwd, _ = heading_vectors(heading)
            vel = fwd * meta.speed_mps
        fix = strip_consensus(
            windows,
            t_ref,
            vel,
            self.cfg.fusion,
            meta.strip_id,
            min_separation_m=self.loc.tile_m,
            speed_sigma_mps=self.cfg.nav.ground_sigma_mps,
        )
        with self._lock:
            est = self.nav.estimate(t_ref)
        accepted = bool(fix.trusted and est is not None and est.valid)
        if accepted:
            d2 = np.hypot(*(np.asarray(fix.xy_m) - np.asarray(est.xy_m)))
            accepted = bool(d2 <= self.cfg.fusion.gate_m + 3 * est.sigma_h_m)
        if fix.trusted and self._to_lonlat is not None and np.all(np.isfinite(fix.xy_m)):
            fix = dataclasses.replace(fix, lonlat_deg=self._to_lonlat(*fix.xy_m))
        self.stats["fixes"] += 1
        self.stats["trusted_fixes"] += int(fix.trusted)
        self.stats["accepted_fixes"] += int(accepted)
        why = "agrees with the navigation filter" if accepted else "not confirmed by the navigation filter"
        rec = {
            "type": "fix",
            **fix.to_dict(),
            "accepted": accepted,
            "filter_reason": why,
            "filter": None if est is None else _est_record(est),
            "wall_s": time.time(),
        }
        rec["xy_m"] = None if not np.all(np.isfinite(fix.xy_m)) else list(fix.xy_m)
        rec["sigma_h_m"] = _finite_or_none(fix.sigma_h_m)
        if not np.all(np.isfinite(np.asarray(fix.cov_xy_m2))):
            rec["cov_xy_m2"] = None
        self.rec.write(rec)
        self.rec.sync()
        logger.info(
            "strip %s: %s (%d/%d windows agree, conf %.2f) %s; %s",
            meta.strip_id,
            "trusted" if fix.trusted else "untrusted",
            fix.n_inliers,
            fix.n_windows,
            fix.confidence,
            fix.reason,
            why,
        )
        return fix

    # ------------------------------------------------------------------------------------------ loop
    def run(self, source: Any = None) -> dict[str, Any]:
        """Process the configured source (or ``source``: any iterable of strip blocks) until it ends or a stop."""
        from sarloc.runtime.sources import open_source

        if source is not None:
            return self._loop(source)
        opts: dict[str, Any] = {}
        if self.cfg.source.startswith("dir://"):
            opts["follow"] = self.cfg.follow
        if self.cfg.source_idle_timeout_s is not None and self.cfg.source.startswith(("dir://", "udp://", "tcp://")):
            opts["idle_timeout_s"] = self.cfg.source_idle_timeout_s
        source = open_source(self.cfg.source, **opts)
        if self.cfg.source.startswith(("udp://", "tcp://")):
            source = Prefetcher(source, self.cfg.queue_blocks)
        return self._loop(source)

    def _loop(self, source: Any) -> dict[str, Any]:
        hashes = {
            "encoder": self.loc.encoder.manifest.get("sha256"),
            "pack": self.loc.pack.manifest.get("parent_sha256"),
            "refiner": getattr(self.loc.refiner, "manifest", {}).get("sha256"),
        }
        self.rec.write(
            {
                "type": "start",
                "config": self.cfg.to_dict(),
                "artifacts": hashes,
                "wall_s": time.time(),
                "skipping": sorted(self.skip),
            }
        )
        self._source = source
        current: str | None = None
        windows: list[WindowFix] = []
        heading_used: float | None = None
        current_meta = None
        try:
            self._start_mavlink()
            for block in source:
                sid = block.meta.strip_id
                if sid != current:
                    if current is not None and windows and current_meta is not None:
                        self._end_strip(current_meta, windows, heading_used)  # its final block never came
                    windows = []
                    if self.stop_requested.is_set():
                        break
                    current, current_meta = sid, block.meta
                    self.stream.reset()
                    heading_used = block.meta.heading_deg
                if sid in self.skip:
                    if block.final:
                        self.stats["strips_skipped"] += 1
                    continue
                wall = time.time()
                self.clock.observe_data(float(block.meta.row_time_s(block.row0 + block.pixels.shape[0])), wall)
                try:
                    h = self._heading(block.meta)
                    if block.meta.heading_deg is None and h is None:
                        raise SarlocError(f"strip {sid}: no heading in its metadata and none from MAVLink; skipped")
                    heading_used = block.meta.heading_deg if h is None else h
                    self._strip_motion(block, heading_used)
                    batch = self.stream.push(block, h)
                    if len(batch):
                        windows += self._windows(batch)
                except SarlocError as e:
                    self.stats["errors"] += 1
                    self.rec.write({"type": "error", "strip_id": sid, "error": str(e), "wall_s": time.time()})
                    logger.error("%s", e)
                if block.final or self.stop_requested.is_set():
                    self._end_strip(block.meta, windows, heading_used)
                    windows, current = [], None
                    if self.cfg.max_strips and self.stats["strips"] >= self.cfg.max_strips:
                        break
                    if self.stop_requested.is_set():
                        break
        finally:
            close = getattr(source, "close", None)
            if close:
                close()
            if self.sender is not None:
                self.sender.stop()  # sends a last no-fix
            if self.link is not None:
                self.stats["mavlink"] = dict(self.link.stats)
                self.link.close()
            self.stats["nav"] = dict(self.nav.stats)
            self.stats["output"] = self._availability()
            self.stats["localizer"] = dict(self.loc.stats)
            if isinstance(source, Prefetcher):
                self.stats["blocks_dropped"] = source.dropped
            src_stats = getattr(getattr(source, "source", source), "stats", None)
            if src_stats is not None:
                self.stats["source"] = src_stats.as_dict() if hasattr(src_stats, "as_dict") else dict(src_stats)
            self.stats["record_errors"] = self.rec.errors
            if self.fatal:
                self.stats["fatal"] = self.fatal
            self.rec.write({"type": "stop", "stats": self.stats, "wall_s": time.time()})
            self.rec.close()
        if self.fatal:
            raise SarlocError(self.fatal)
        return self.stats

    def _end_strip(self, meta, windows: list[WindowFix], heading: float | None) -> None:
        self.stats["strips"] += 1
        self._fix(meta, windows, heading)

    def _availability(self) -> dict[str, Any]:
        o = dict(self._out_stats)
        n = o["ticks_since_first_valid"]
        o["availability_since_first_fix"] = round(o["valid_ticks"] / n, 4) if n else None
        return o

    def request_stop(self, *_: Any) -> None:
        """Stop soon: the source is stopped at once, what was read is processed (a second call: stop now)."""
        if self.stop_requested.is_set():
            raise KeyboardInterrupt
        logger.warning("stop requested: stopping the source and finishing what was read")
        self.stop_requested.set()
        stop = getattr(getattr(self._source, "source", self._source), "stop", None)
        if stop is not None:
            try:
                stop()
            except Exception as e:  # a source that cannot stop still ends at its next block
                logger.warning("source stop failed (%s)", brief(e))


def eas_to_tas(alt_amsl_m: float) -> float:
    """True / equivalent airspeed ratio at an altitude in the ISA troposphere, ``sqrt(rho0 / rho)``.

    ArduPilot's VFR_HUD airspeed is the equivalent airspeed; the air moves the vehicle at the true airspeed (5 %
    more at 1,000 m). Altitudes outside -500..11,000 m are clamped.
    """
    h = min(max(float(alt_amsl_m), -500.0), 11_000.0) if math.isfinite(alt_amsl_m) else 0.0
    return (1.0 - 2.25577e-5 * h) ** (-4.25588 / 2.0)


def _duration(dt_s: float) -> str:
    """``dt_s`` (data time - wall time) in words: "3.1 days behind", "12 s ahead of"."""
    a = abs(dt_s)
    text = f"{a / 86400:.1f} days" if a >= 86400 else f"{a / 3600:.1f} h" if a >= 3600 else f"{a:.0f} s"
    return f"{text} {'behind' if dt_s < 0 else 'ahead of'}"


def _est_record(est) -> dict[str, Any]:
    return {
        "t_s": est.t_s,
        "xy_m": list(est.xy_m),
        "vel_mps": list(est.vel_mps),
        "bias_mps": list(est.bias_mps),
        "scale": est.scale,
        "heading_offset_deg": est.heading_offset_deg,
        "sigma_h_m": _finite_or_none(est.sigma_h_m),
        "sigma_v_mps": _finite_or_none(est.sigma_v_mps),
        "valid": est.valid,
    }


def _grid_convergence_deg(crs: str, pack) -> float:
    """Grid heading minus true heading at the pack's centre (0 with a warning when the CRS cannot tell)."""
    from sarloc.core.geo import grid_convergence_deg

    try:
        x0, y0 = (float(v) for v in pack.centres_m().mean(axis=0))
        return grid_convergence_deg(crs, x0, y0)
    except Exception as e:  # a projection that fails here only loses a sub-degree correction
        logger.warning("meridian convergence unknown (%s); headings used as grid headings", brief(e))
        return 0.0


def run(cfg: RunConfig, install_signals: bool = True) -> dict[str, Any]:
    """Run the daemon until the source ends, ``max_strips``, or SIGTERM/SIGINT. Returns the counters.

    The signal handlers are installed for the run and the previous ones restored after it.

    Raises:
        SarlocError: the MAVLink link is unusable and ``require_autopilot_s`` makes that fatal (after a clean stop).
    """
    d = Daemon(cfg)
    if not (install_signals and threading.current_thread() is threading.main_thread()):
        return d.run()
    old = {sig: signal.signal(sig, d.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return d.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


__all__ = ["Daemon", "Recorder", "RunConfig", "done_strips", "load_run_config", "run"]
