"""Live SAR strip simulator (torch-free): cuts strips from a scene's SAR image along a vehicle's true trajectory.

For closed-loop tests (e.g. an ArduPilot SITL whose SIMSTATE gives the true position at 10-50 Hz): push each
truth sample to a :class:`StripCutter`, send the blocks it returns to the onboard daemon (e.g. with
:class:`UdpStripFeeder` to a ``udp://`` source), let the daemon's fixes feed the autopilot, and score them with
:meth:`StripCutter.truth`.

Geometry: exactly the strip convention of :mod:`sarloc.runtime.types`. A strip starts at a pushed sample ``t0_s``
with the vehicle's true course there as its heading ``psi`` and ``row_rate_hz = speed_at_start / gsd_m``. Strip
pixel ``(i, j)`` (array index; continuous centre ``(i + .5, j + .5)``, as in :mod:`sarloc.sim.flight`) holds
the scene SAR, bilinearly interpolated, at::

    ground = vehicle(t0_s + (j + .5) / row_rate_hz) + ((i + .5 - W / 2) * gsd_m + across_offset_m) * right(psi)

with ``vehicle(t)`` linearly interpolated between the pushed samples. On a straight, constant-speed flight this is
exactly what :func:`~sarloc.sim.flight.simulate_flight` cuts, and a window of the strip maps back to the
true vehicle position with :func:`~sarloc.runtime.windows.vehicle_from_window`. On a curved or accelerating flight
the rows still follow the true vehicle (motion errors a real SAR would have to compensate); the strip ends when
the course leaves ``heading +- max_turn_deg`` or the speed changes by more than ``max_speed_change``.

Live rules: a row is cut only once the trajectory has reached its centre time (nothing from the future), and a
block is returned once ``block_rows + 1`` rows are waiting (one row is held back so that a strip ending without
warning, at a turn, still has a non-empty final block); the last block of a strip has ``final=True`` and may be
shorter. Memory is bounded: samples older than the straight-flight window and the next row's time are dropped.

Un-georeferenced scenes (real pairs with only ``gsd_m_estimate``) can be given a synthetic UTM position with
:func:`~sarloc.sim.placement.geo_place_scene` (re-exported here) so that the daemon and the map pack produce lat/lon.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from sarloc.core.config import finite_number
from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.geo import metric_to_pixel, pixel_metric_affine, sample_metric
from sarloc.core.scene import Scene, load_scene
from sarloc.runtime.frames import UDP_MAX_BYTES, encode_frames
from sarloc.runtime.types import Strip, StripMeta, heading_vectors
from sarloc.sim.placement import geo_place_scene

logger = logging.getLogger(__name__)

__all__ = [
    "END_REASONS",
    "LIVE_TRUTH_SCHEMA",
    "StripCutter",
    "StripCutterConfig",
    "UdpStripFeeder",
    "geo_place_scene",
]

LIVE_TRUTH_SCHEMA = 1
#: why a strip ended (``end_reason`` in the truth)
END_REASONS = ("max_rows", "turn", "speed_change", "left_scene", "gap", "finish")
_MARGIN_PX = 1.0  # a row's footprint must stay this far inside the image (bilinear needs both neighbours)
_WHERE = "strip cutter"


# =============================================================================================================
# config


def _bad(name: str, v: Any, what: str) -> ConfigError:
    return ConfigError(f"{_WHERE}: {name}={v!r:.40} must be {what}")


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise _bad(name, v, f"an integer >= {lo}")
    return int(v)


def _num(name: str, v: Any, *, lo: float | None = None, lo_open: bool = False, hi: float | None = None) -> float:
    f = finite_number(v)
    if f is None or (lo is not None and (f <= lo if lo_open else f < lo)) or (hi is not None and f > hi):
        if lo is None:
            what = "a finite number"
        elif hi is None:
            what = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(name, v, what)
    return f


@dataclass(frozen=True)
class StripCutterConfig:
    """Parameters of a :class:`StripCutter` (checked at construction; a bad value raises a one-line ConfigError).

    Attributes:
        gsd_m: strip metres per pixel (square); None = the scene's mean gsd.
        width_px: strip width (across track), pixels.
        max_rows: longest strip, rows.
        block_rows: rows per returned block (the last block of a strip may be shorter).
        min_speed_mps: no strip starts below this ground speed.
        max_turn_deg: a strip starts when every course of the last ``straight_s`` seconds is within this of the
            current course, and ends when the course deviates from the strip heading by more than this.
        max_speed_change: the same for the speed, as a fraction of the speed at the strip start.
        across_offset_m: strip centre line offset from the track, metres, positive to the right.
        heading_noise_deg: one-sigma Gaussian noise on the heading written into ``StripMeta`` (seeded; the pixels
            are always cut along the true course).
        speckle_looks: multiplicative Gamma speckle with this many looks, added in dB (seeded); None = none.
        seed: random seed (heading noise and speckle use separate streams).
        straight_s: how long the course and speed must be steady before a strip starts, seconds.
        max_gap_s: a pause between samples longer than this ends the strip and restarts the steadiness window.
    """

    gsd_m: float | None = None
    width_px: int = 160
    max_rows: int = 256
    block_rows: int = 32
    min_speed_mps: float = 5.0
    max_turn_deg: float = 5.0
    max_speed_change: float = 0.1
    across_offset_m: float = 0.0
    heading_noise_deg: float = 0.0
    speckle_looks: float | None = None
    seed: int = 0
    straight_s: float = 2.0
    max_gap_s: float = 1.0

    def __post_init__(self) -> None:
        if self.gsd_m is not None:
            _num("gsd_m", self.gsd_m, lo=0.0, lo_open=True)
        _int("width_px", self.width_px, 2)
        _int("max_rows", self.max_rows, 1)
        _int("block_rows", self.block_rows, 1)
        _num("min_speed_mps", self.min_speed_mps, lo=0.0, lo_open=True)
        _num("max_turn_deg", self.max_turn_deg, lo=0.0, lo_open=True, hi=180.0)
        _num("max_speed_change", self.max_speed_change, lo=0.0, lo_open=True)
        _num("across_offset_m", self.across_offset_m)
        _num("heading_noise_deg", self.heading_noise_deg, lo=0.0)
        if self.speckle_looks is not None:
            _num("speckle_looks", self.speckle_looks, lo=0.0, lo_open=True)
        _int("seed", self.seed, 0)
        _num("straight_s", self.straight_s, lo=0.0)
        _num("max_gap_s", self.max_gap_s, lo=0.0, lo_open=True)


# =============================================================================================================
# the cutter


def _wrap_deg(a: float | np.ndarray) -> float | np.ndarray:
    """Angle difference wrapped to [-180, 180)."""
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


@dataclass
class _Active:
    """The strip being cut. Times are relative to the cutter's epoch."""

    strip_id: str
    t0_rel: float
    row_rate_hz: float
    heading_true_deg: float  # the course at t0: pixels are cut along it
    meta: StripMeta
    speed0_mps: float
    start_xy_m: tuple[float, float]
    next_row: int = 0  # rows cut so far
    rows_emitted: int = 0  # rows returned in blocks so far
    pending: np.ndarray | None = None  # cut rows not yet returned, (n, W) float32
    last_course_deg: float = 0.0

    def row_time_rel(self, j: np.ndarray | int) -> np.ndarray:
        """Centre time of array row ``j`` (continuous row ``j + .5``), relative to the epoch."""
        return self.t0_rel + (np.asarray(j, np.float64) + 0.5) / self.row_rate_hz


class StripCutter:
    """Cuts SAR strips from a scene along a trajectory that arrives sample by sample (see the module docstring).

    Args:
        scene: a scene folder or a loaded :class:`~sarloc.core.scene.Scene` (its ``sar_gray`` and ``frame``).
        cfg: parameters; None = the defaults.

    Raises:
        ConfigError: a parameter is out of range (or the scene's gsd is unusable).
        SceneError: the scene does not load.
    """

    def __init__(self, scene: str | Path | Scene, cfg: StripCutterConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else StripCutterConfig()
        if not isinstance(self.cfg, StripCutterConfig):
            raise ConfigError(f"{_WHERE}: cfg must be a StripCutterConfig, got {type(self.cfg).__name__}")
        sc = scene if isinstance(scene, Scene) else load_scene(scene)
        self.scene = sc
        self._frame = sc.frame
        self._img = np.asarray(sc.sar_gray, np.float32)
        gsd = self.cfg.gsd_m if self.cfg.gsd_m is not None else float(sc.frame.mean_gsd_m)
        self.gsd_m = _num("gsd_m", gsd, lo=0.0, lo_open=True)
        self.width_px = int(self.cfg.width_px)
        self._affine = pixel_metric_affine(self._frame)
        self._across_m = (np.arange(self.width_px) + 0.5 - self.width_px / 2.0) * self.gsd_m + float(
            self.cfg.across_offset_m
        )
        self._edge_m = np.array([-self.width_px / 2.0, self.width_px / 2.0]) * self.gsd_m + float(
            self.cfg.across_offset_m
        )
        heading_ss, speckle_ss = np.random.SeedSequence(int(self.cfg.seed)).spawn(2)
        self._heading_rng = np.random.default_rng(heading_ss)
        self._speckle_rng = np.random.default_rng(speckle_ss)
        self._epoch: float | None = None
        self._samples: deque[tuple[float, float, float, float, float]] = deque()  # (t_rel, x, y, course, speed)
        self._active: _Active | None = None
        self._next_id = 0
        self._truth: list[dict[str, Any]] = []
        self.stats = {"samples": 0, "samples_dropped": 0, "strips": 0, "blocks": 0, "rows": 0}

    # --- public ----------------------------------------------------------------------------------------------

    @property
    def buffered_samples(self) -> int:
        """Trajectory samples held now (bounded by the steadiness window and the next row's time)."""
        return len(self._samples)

    @property
    def active_strip_id(self) -> str | None:
        """The strip being cut, or None."""
        return None if self._active is None else self._active.strip_id

    def push(self, t_s: float, x_m: float, y_m: float, course_deg: float, speed_mps: float) -> list[Strip]:
        """Feed one truth sample; return the strip blocks that became complete (possibly none).

        Args:
            t_s: sample time, seconds (the clock of the strips' ``t0_s``); samples not after the previous one are
                dropped (counted in ``stats['samples_dropped']``).
            x_m, y_m: true vehicle position, scene metric frame (easting, northing), metres.
            course_deg: direction of the ground velocity, degrees clockwise from grid north of that frame.
            speed_mps: ground speed, m/s (>= 0).

        Raises:
            SarlocError: a value is not finite or the speed is negative.
        """
        vals = {"t_s": t_s, "x_m": x_m, "y_m": y_m, "course_deg": course_deg, "speed_mps": speed_mps}
        for name, v in vals.items():
            if finite_number(v) is None:
                raise SarlocError(f"{_WHERE}: sample {name}={v!r:.40} must be a finite number")
        if speed_mps < 0:
            raise SarlocError(f"{_WHERE}: sample speed_mps={speed_mps!r:.40} must be >= 0")
        if self._epoch is None:
            self._epoch = float(t_s)
        t_rel = float(t_s) - self._epoch
        if self._samples and t_rel <= self._samples[-1][0]:
            self.stats["samples_dropped"] += 1
            logger.debug("%s: sample at t=%.6f s is not after the previous one; dropped", _WHERE, t_s)
            return []
        self.stats["samples"] += 1
        sample = (t_rel, float(x_m), float(y_m), float(course_deg) % 360.0, float(speed_mps))
        out: list[Strip] = []
        if self._samples and t_rel - self._samples[-1][0] > self.cfg.max_gap_s:
            if self._active is not None:
                out += self._end("gap")
            self._samples.clear()
        self._samples.append(sample)
        a = self._active
        if a is not None:
            dev = abs(float(_wrap_deg(sample[3] - a.heading_true_deg)))
            if dev > self.cfg.max_turn_deg:
                out += self._end("turn")
            elif abs(sample[4] - a.speed0_mps) > self.cfg.max_speed_change * a.speed0_mps:
                out += self._end("speed_change")
            else:
                a.last_course_deg = sample[3]
                out += self._cut()
        if self._active is None and self._can_start():
            self._start()
            out += self._cut()
        self._trim()
        return out

    def finish(self) -> list[Strip]:
        """End the current strip (its rows cut so far); returns its remaining blocks, the last one final."""
        return self._end("finish") if self._active is not None else []

    def truth(self) -> dict[str, Any]:
        """Ground truth of every strip so far (JSON-able; the strip being cut has ``end_reason`` None).

        Per strip: ``strip_id``, ``t0_s``, ``t_end_s`` (time of the end edge of the last row), ``rows``,
        ``row_rate_hz``, ``speed_mps`` (at the start), ``heading_deg`` (written in the metadata, with noise),
        ``true_heading_deg`` (the course at the start: the pixels are cut along it), ``heading_error_deg``,
        ``course_end_deg`` (last course seen during the strip), ``vehicle_start_xy_m`` (vehicle at ``t0_s``),
        ``vehicle_end_xy_m`` (vehicle at ``t_end_s``, extrapolated from the last samples when later), their
        ``*_lonlat_deg`` twins on geo-referenced scenes, ``end_reason`` (one of :data:`END_REASONS`).
        """
        strips = list(self._truth)
        if self._active is not None and self._active.next_row > 0:
            strips.append(self._strip_truth(self._active, None))
        return {
            "schema": LIVE_TRUTH_SCHEMA,
            "kind": "sarloc.live_strip_truth",
            "scene": self.scene.name,
            "scene_path": str(self.scene.path),
            "crs": self._frame.crs,
            "metric_crs": self._frame.metric_crs,
            "gsd_m": self.gsd_m,
            "width_px": self.width_px,
            "config": asdict(self.cfg),
            "stats": dict(self.stats),
            "strips": strips,
        }

    # --- internals -------------------------------------------------------------------------------------------

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.array(self._samples, np.float64)
        return s[:, 0], s[:, 1], s[:, 2]

    def _vehicle_at(self, t_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vehicle position at relative times: linear between samples, extrapolated beyond the last one."""
        t, x, y = self._arrays()
        tq = np.asarray(t_rel, np.float64)
        vx, vy = np.interp(tq, t, x), np.interp(tq, t, y)
        if len(t) >= 2:
            late = tq > t[-1]
            if np.any(late):
                dt = tq[late] - t[-1]
                vx[late] = x[-1] + dt * (x[-1] - x[-2]) / (t[-1] - t[-2])
                vy[late] = y[-1] + dt * (y[-1] - y[-2]) / (t[-1] - t[-2])
        return vx, vy

    def _inside(self, vx: np.ndarray, vy: np.ndarray, heading_deg: float) -> np.ndarray:
        """(n,) bool: both ends of the row through each vehicle position lie inside the image."""
        _, right = heading_vectors(heading_deg)
        gx = vx[:, None] + self._edge_m[None, :] * right[0]
        gy = vy[:, None] + self._edge_m[None, :] * right[1]
        col, row = metric_to_pixel(self._frame, gx, gy, self._affine)
        w, h = self._frame.width_px, self._frame.height_px
        ok = (col >= _MARGIN_PX) & (col <= w - _MARGIN_PX) & (row >= _MARGIN_PX) & (row <= h - _MARGIN_PX)
        return np.asarray(ok.all(axis=1))

    def _can_start(self) -> bool:
        cfg = self.cfg
        t_k, x_k, y_k, course_k, speed_k = self._samples[-1]
        if speed_k < cfg.min_speed_mps or self._samples[0][0] > t_k - cfg.straight_s:
            return False
        s = np.array(self._samples, np.float64)
        if np.abs(_wrap_deg(s[:, 3] - course_k)).max() > cfg.max_turn_deg:
            return False
        if np.abs(s[:, 4] - speed_k).max() > cfg.max_speed_change * speed_k:
            return False
        fwd, _ = heading_vectors(course_k)
        ahead = min(cfg.block_rows, cfg.max_rows) * self.gsd_m * np.array([0.0, 1.0])
        return bool(self._inside(x_k + ahead * fwd[0], y_k + ahead * fwd[1], course_k).all())

    def _start(self) -> None:
        t_k, x_k, y_k, course_k, speed_k = self._samples[-1]
        sid = f"strip_{self._next_id:06d}"
        noise = float(self._heading_rng.normal(0.0, self.cfg.heading_noise_deg)) if self.cfg.heading_noise_deg else 0.0
        rate = speed_k / self.gsd_m
        meta = StripMeta(
            strip_id=sid,
            gsd_m=self.gsd_m,
            heading_deg=float((course_k + noise) % 360.0),
            t0_s=float(self._epoch + t_k),  # type: ignore[operator]
            row_rate_hz=rate,
            across_offset_m=float(self.cfg.across_offset_m),
            scale="db",
        )
        self._active = _Active(sid, t_k, rate, course_k, meta, speed_k, (x_k, y_k), last_course_deg=course_k)
        logger.debug("%s: %s starts at t=%.3f s, heading %.2f deg, %.2f m/s", _WHERE, sid, meta.t0_s, course_k, speed_k)

    def _cut(self) -> list[Strip]:
        """Cut the rows whose centre time has been reached; return the blocks that filled."""
        a = self._active
        assert a is not None
        t_k = self._samples[-1][0]
        n_max = self.cfg.max_rows - a.next_row
        n_est = math.floor((t_k - a.t0_rel) * a.row_rate_hz - 0.5 - a.next_row) + 2
        j = np.arange(a.next_row, a.next_row + max(0, min(n_est, n_max)))
        j = j[a.row_time_rel(j) <= t_k]
        ended: str | None = None
        if len(j):
            vx, vy = self._vehicle_at(a.row_time_rel(j))
            ok = self._inside(vx, vy, a.heading_true_deg)
            if not ok.all():
                n = int(np.argmin(ok))
                j, vx, vy, ended = j[:n], vx[:n], vy[:n], "left_scene"
            if len(j):
                if a.next_row == 0:
                    self._next_id += 1  # the id is used once the strip has a row
                _, right = heading_vectors(a.heading_true_deg)
                gx = vx[:, None] + self._across_m[None, :] * right[0]
                gy = vy[:, None] + self._across_m[None, :] * right[1]
                pix = sample_metric(self._img, self._frame, gx, gy, self._affine)
                if self.cfg.speckle_looks is not None:
                    looks = float(self.cfg.speckle_looks)
                    pix = pix + 10.0 * np.log10(self._speckle_rng.gamma(looks, 1.0 / looks, size=pix.shape))
                pix32 = pix.astype(np.float32)
                a.pending = pix32 if a.pending is None else np.concatenate([a.pending, pix32])
                a.next_row += len(j)
                self.stats["rows"] += len(j)
        if ended is None and a.next_row >= self.cfg.max_rows:
            ended = "max_rows"
        if ended is not None:
            return self._end(ended)
        return self._blocks(final=False)

    def _blocks(self, final: bool) -> list[Strip]:
        """Blocks of ``block_rows`` from the pending rows (all of them, the last final, when ``final``)."""
        a = self._active
        assert a is not None
        out: list[Strip] = []
        b = self.cfg.block_rows
        while a.pending is not None and (len(a.pending) > b or (final and len(a.pending) > 0)):
            n = min(b, len(a.pending))
            last = final and n == len(a.pending)
            out.append(Strip(meta=a.meta, pixels=a.pending[:n].copy(), row0=a.rows_emitted, final=last))
            a.pending = a.pending[n:]
            a.rows_emitted += n
        self.stats["blocks"] += len(out)
        return out

    def _end(self, reason: str) -> list[Strip]:
        a = self._active
        assert a is not None
        out = self._blocks(final=True)
        if a.next_row > 0:
            self._truth.append(self._strip_truth(a, reason))
            self.stats["strips"] += 1
            logger.debug("%s: %s ends (%s) after %d rows", _WHERE, a.strip_id, reason, a.next_row)
        self._active = None
        return out

    def _lonlat(self, x: float, y: float) -> list[float] | None:
        if not self._frame.georeferenced:
            return None
        c, r = metric_to_pixel(self._frame, np.array([x]), np.array([y]), self._affine)
        lon, lat = self._frame.pixel_to_lonlat(c, r)
        return [float(lon[0]), float(lat[0])]

    def _strip_truth(self, a: _Active, reason: str | None) -> dict[str, Any]:
        t_end_rel = a.t0_rel + a.next_row / a.row_rate_hz
        ex, ey = self._vehicle_at(np.array([t_end_rel]))
        end = (float(ex[0]), float(ey[0]))
        head = float(a.meta.heading_deg)  # type: ignore[arg-type]
        return {
            "strip_id": a.strip_id,
            "t0_s": a.meta.t0_s,
            "t_end_s": float(self._epoch + t_end_rel),  # type: ignore[operator]
            "rows": a.next_row,
            "width_px": self.width_px,
            "gsd_m": self.gsd_m,
            "row_rate_hz": a.row_rate_hz,
            "speed_mps": a.speed0_mps,
            "across_offset_m": float(self.cfg.across_offset_m),
            "heading_deg": head,
            "true_heading_deg": a.heading_true_deg,
            "heading_error_deg": float(_wrap_deg(head - a.heading_true_deg)),
            "course_end_deg": a.last_course_deg,
            "vehicle_start_xy_m": [a.start_xy_m[0], a.start_xy_m[1]],
            "vehicle_end_xy_m": [end[0], end[1]],
            "vehicle_start_lonlat_deg": self._lonlat(*a.start_xy_m),
            "vehicle_end_lonlat_deg": self._lonlat(*end),
            "end_reason": reason,
        }

    def _trim(self) -> None:
        """Drop samples no longer needed: older than the steadiness window and the next row's time."""
        if not self._samples:
            return
        keep = self._samples[-1][0] - self.cfg.straight_s
        if self._active is not None:
            keep = min(keep, float(self._active.row_time_rel(self._active.next_row)))
        while len(self._samples) >= 2 and self._samples[1][0] <= keep:
            self._samples.popleft()


# =============================================================================================================
# sending


class UdpStripFeeder:
    """Sends strip blocks to a ``udp://HOST:PORT`` strip source as SLS1 frames over one open socket.

    Counters: ``frames_sent``, ``blocks_sent``, ``bytes_sent``, ``send_errors`` (a datagram the OS refused, e.g.
    while nothing listens yet; logged once, then counted).

    Args:
        url: ``udp://HOST:PORT`` of the daemon's source.
        max_bytes: largest datagram, bytes (64..65507).
        pace_s: pause after each datagram, seconds (a slow reader drops datagrams it cannot buffer).

    Raises:
        SarlocError: malformed URL or ``max_bytes`` out of range.
    """

    def __init__(self, url: str, *, max_bytes: int = UDP_MAX_BYTES, pace_s: float = 0.0) -> None:
        u = urlsplit(str(url))
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme.lower() != "udp" or not u.hostname or port is None:
            raise SarlocError(f"udp feeder: {str(url)[:200]!r} is not udp://HOST:PORT, e.g. udp://127.0.0.1:5600")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 64 <= max_bytes <= 65_507:
            raise SarlocError(f"udp feeder: max_bytes={max_bytes!r:.40} must be an integer in 64..65507")
        if finite_number(pace_s) is None or pace_s < 0:
            raise SarlocError(f"udp feeder: pace_s={pace_s!r:.40} must be a number >= 0")
        self.url = f"udp://{u.hostname}:{port}"
        self.addr = (u.hostname, int(port))
        self.max_bytes = int(max_bytes)
        self.pace_s = float(pace_s)
        self.frames_sent = 0
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.send_errors = 0
        fam = socket.AF_INET6 if ":" in u.hostname else socket.AF_INET
        self._sock: socket.socket | None = socket.socket(fam, socket.SOCK_DGRAM)

    def send(self, blocks: Strip | Iterable[Strip]) -> int:
        """Send blocks (each split into datagrams of at most ``max_bytes``); returns the frames sent now.

        Raises:
            SarlocError: the feeder is closed, or one row does not fit in a datagram.
        """
        if self._sock is None:
            raise SarlocError(f"udp feeder {self.url}: closed; create a new feeder")
        n = 0
        for block in [blocks] if isinstance(blocks, Strip) else blocks:
            for frame in encode_frames(block, self.max_bytes):
                try:
                    self._sock.sendto(frame, self.addr)
                except OSError as e:
                    if self.send_errors == 0:
                        logger.warning("udp feeder %s: send failed (%s); counting further failures", self.url, e)
                    self.send_errors += 1
                    continue
                n += 1
                self.bytes_sent += len(frame)
                if self.pace_s > 0:
                    time.sleep(self.pace_s)
            self.blocks_sent += 1
        self.frames_sent += n
        return n

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "frames_sent": self.frames_sent,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "send_errors": self.send_errors,
        }

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> UdpStripFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
