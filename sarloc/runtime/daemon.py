"""The onboard daemon (torch-free): strips in, positions at the current time out (JSONL records and MAVLink).

``sarloc run --config onboard.toml`` (every option also a flag) builds a :class:`~sarloc.runtime.config.RunConfig`
(:mod:`sarloc.runtime.config`, re-exported here with :func:`load_run_config`) and calls :func:`run`.

Data path, per block of rows as it arrives: windows (north-up, on the pack grid) ->
:class:`~sarloc.runtime.localizer.Localizer` -> one JSONL ``window`` record each -> the navigation filter
(:mod:`sarloc.runtime.navfilter`): a trusted window enters at its acquisition time if it agrees with the track; before
the filter has a position, a sliding consensus over the recent windows (across strip boundaries,
:mod:`sarloc.runtime.fusion`) initialises it. At a strip's last block, the strip's own consensus is recorded as a
``fix`` record (the unit of ``sarloc report`` and ``sarloc replay``). A :class:`~sarloc.runtime.mavlink.MavlinkSender`
thread sends the filter's state predicted to *now* at ``gps_rate_hz`` (default 10 Hz), between fixes too, with
accuracies from the filter covariance; it sends no-fix while the filter has no position or its one-sigma error is
beyond ``[nav] max_sigma_m``, and once more on exit (:mod:`sarloc.runtime.autopilot_io`, which also takes the motion
input between fixes, the heading and clock samples from the autopilot).

Motion between fixes (``motion``: the autopilot's heading and airspeed, its ground velocity, or the strips'
metadata) and the clock (``clock``: how strip times relate to "now", :mod:`sarloc.runtime.clockmap`) are described in
:mod:`sarloc.runtime.config`.

Records (:mod:`sarloc.runtime.records`; one JSON object per line, flushed at once, fsync'd at every strip end):
``start`` (config, artifact hashes), ``window``, ``fix``, ``nav`` (the filter's state about once a second and at
every initialisation), ``error``, ``stop`` (counters, fix availability). Network sources are read ahead on their own
thread (:mod:`sarloc.runtime.prefetch`).

Stopping: SIGTERM / SIGINT stop the source at once; what was read is processed, the current strip's fix is written
and a last no-fix goes to the autopilot (a second signal stops at once). Restarting with ``resume = true`` skips
strips that already have a ``fix`` record in the output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import SarlocError, brief
from sarloc.runtime.autopilot_io import WIND_PRIOR_SIGMA_MPS, AutopilotIO, eas_to_tas, pack_frame, pack_from_lonlat
from sarloc.runtime.clockmap import ClockMap
from sarloc.runtime.config import CLOCKS, MOTIONS, RunConfig, load_run_config
from sarloc.runtime.fusion import Corroboration, SlidingWindows, strip_consensus
from sarloc.runtime.localizer import Localizer
from sarloc.runtime.navfilter import NavFilter
from sarloc.runtime.prefetch import Prefetcher
from sarloc.runtime.records import Recorder, done_strips, est_record, fix_record
from sarloc.runtime.types import Fix, NavState, WindowFix, heading_vectors

logger = logging.getLogger(__name__)


class Daemon:
    """The processing loop (see the module docstring); :func:`run` is the usual entry point.

    The MAVLink side (link, sender, motion input, the NavState sent) is ``self.autopilot``
    (:class:`~sarloc.runtime.autopilot_io.AutopilotIO`); ``link``, ``sender`` and :meth:`nav_state` reach it.
    """

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
        fc = cfg.fusion
        self.corroboration = Corroboration(fc.corroborate_px * gsd, fc.corroborate_s) if fc.corroborate_px > 0 else None
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
        self._lock = threading.Lock()
        # grid heading = true heading + _grid_from_true_deg (meridian convergence)
        self._to_lonlat, self._grid_from_true_deg = pack_frame(self.loc.pack)
        self.autopilot = AutopilotIO(
            cfg,
            self.nav,
            self.clock,
            self.rec,
            self._lock,
            self._to_lonlat,
            self._grid_from_true_deg,
            pack_from_lonlat(self.loc.pack) if cfg.gnss_aiding else None,
        )
        self._source: Any = None
        self._course_done: deque[str] = deque(maxlen=64)  # strips whose course the filter has decided on

    # ------------------------------------------------------------------------------------------ MAVLink
    @property
    def link(self) -> Any:
        """The MAVLink link (None without MAVLink)."""
        return self.autopilot.link

    @link.setter
    def link(self, link: Any) -> None:
        self.autopilot.link = link

    @property
    def sender(self) -> Any:
        """The MAVLink sender thread (None without MAVLink)."""
        return self.autopilot.sender

    def nav_state(self, now_s: float) -> NavState:
        """The filter's state predicted to wall time ``now_s`` (UNIX) as a :class:`NavState` for the sender."""
        return self.autopilot.nav_state(now_s)

    def _wind_prior(self) -> tuple[tuple[float, float], float] | None:
        """The autopilot's wind estimate (grid frame) as the filter's starting wind, while it is fresh."""
        return self.autopilot.wind_prior()

    def _start_mavlink(self) -> None:
        if not self.cfg.mavlink:
            return
        self.autopilot.start()
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
        if self.cfg.motion == "auto" and self.autopilot.airspeed_known():
            return
        fwd, _ = heading_vectors(heading)
        v = fwd * block.meta.speed_mps
        rows = block.pixels.shape[0]
        with self._lock:
            for r in (block.row0, block.row0 + rows - 1):
                self.nav.add_motion(float(block.meta.row_time_s(r)), "ground", (float(v[0]), float(v[1])))

    def _strip_course(self, block) -> None:
        """The strip metadata's course (the SAR's own motion measurement) as a course measurement of the filter,
        while the motion input comes from the autopilot (with the strips' own velocity as the input it adds
        nothing). The heading is the course at the strip's start (its pixels are laid out across it), so it is
        measured once per strip, at ``t0_s``: the vehicle's course may wander from it along the strip (a copter's by
        up to the strip's tolerance), and the motion input carries the course from there."""
        sigma = self.cfg.nav.course_sigma_deg
        if block.meta.heading_deg is None or sigma <= 0 or self.cfg.motion == "strip":
            return
        if self.cfg.motion == "auto" and not self.autopilot.airspeed_known():
            return  # auto without airspeed: the strips' velocity is the input
        sid = block.meta.strip_id
        if sid in self._course_done:
            return
        now = self.clock.now(time.time())
        if now is None:
            return
        with self._lock:
            applied, reason = self.nav.add_course(float(block.meta.t0_s), float(block.meta.heading_deg), sigma, now)
        if applied or reason.startswith("gated") or reason == "course outside the history":
            self._course_done.append(sid)  # decided; otherwise (no position or input yet) the next block tries

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
                        "alternatives": r.alternatives,
                        "nav": verdict,
                        "wall_s": time.time(),
                    }
                )
        self.stats["windows"] += len(res)
        return fixes

    def _apply_window(self, w: WindowFix, now: float) -> str:
        """One trusted window into the navigation filter at its acquisition time (gated there); the verdict."""
        assert w.vehicle_xy_m is not None
        ok, why = self.nav.add_fix(w.t_s, w.vehicle_xy_m, w.sigma_m * self.cfg.fusion.window_sigma_scale, now)
        self.stats["windows_applied"] += int(ok)
        self.stats["windows_gated"] += int(why.startswith("gated"))
        return why

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
            for w in windows:
                if w.vehicle_xy_m is None or not w.trusted:
                    verdicts.append("untrusted")
                    continue
                ready = [w] if self.corroboration is None else self.corroboration.push(w, self.nav.displacement_m)
                why = "held: no agreeing window yet"
                for x in sorted(ready, key=lambda v: v.t_s):
                    verdict = self._apply_window(x, now)
                    gated |= verdict.startswith("gated")
                    if x is w:
                        why = verdict
                    else:  # held earlier, corroborated now: its record says so
                        self.rec.write({"type": "window_late", "strip_id": x.strip_id, "index": x.index,
                                        "t_s": x.t_s, "vehicle_xy_m": x.vehicle_xy_m, "nav": verdict,
                                        "wall_s": wall})  # fmt: skip
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
                    sigma = max(c.sigma_h_m, 1.0) * self.cfg.fusion.window_sigma_scale
                    changed, why = self.nav.add_consensus(c.t_s, c.xy_m, sigma, now, self._wind_prior())
                    if changed:
                        est = self.nav.estimate(now)
                        logger.info("navigation: %s (%s)", why, c.reason)
                        self.rec.write(
                            {"type": "nav", "event": why, "consensus": c.reason, "wall_s": wall, **est_record(est)}
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
        accepted = False
        if fix.trusted and est is not None and est.valid:
            d2 = np.hypot(*(np.asarray(fix.xy_m) - np.asarray(est.xy_m)))
            accepted = bool(d2 <= self.cfg.fusion.gate_m + 3 * est.sigma_h_m)
        if fix.trusted and self._to_lonlat is not None and np.all(np.isfinite(fix.xy_m)):
            fix = dataclasses.replace(fix, lonlat_deg=self._to_lonlat(*fix.xy_m))
        self.stats["fixes"] += 1
        self.stats["trusted_fixes"] += int(fix.trusted)
        self.stats["accepted_fixes"] += int(accepted)
        why = "agrees with the navigation filter" if accepted else "not confirmed by the navigation filter"
        self.rec.write(fix_record(fix, accepted, why, est))
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
        self._write_start()
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
                heading_used = self._block(block, windows, heading_used)
                if block.final or self.stop_requested.is_set():
                    self._end_strip(block.meta, windows, heading_used)
                    windows, current = [], None
                    if self.cfg.max_strips and self.stats["strips"] >= self.cfg.max_strips:
                        break
                    if self.stop_requested.is_set():
                        break
        finally:
            self._finish(source)
        if self.fatal:
            raise SarlocError(self.fatal)
        mav = self.stats.get("mavlink") or {}
        if mav.get("dropped_link_down") and not (mav.get("sent_HEARTBEAT") or mav.get("sent_GPS_INPUT")):
            url = self.cfg.mavlink_opts.get("url", "")
            raise SarlocError(
                f"MAVLink: nothing reached the autopilot: the link {url} never opened (the log says why); free the "
                "port or fix [mavlink] url (the fixes are in records.jsonl)"
            )
        return self.stats

    def _write_start(self) -> None:
        """The ``start`` record: the config, the artifacts' hashes and the strips ``resume`` skips."""
        hashes = {  # sarloc.eval.replay checks each against the files (ARTIFACT_FILES there)
            "encoder": self.loc.encoder.manifest.get("sha256"),
            "pack_manifest": getattr(self.loc.pack, "manifest_sha256", None),
            "refiner": getattr(self.loc.refiner, "manifest", {}).get("sha256"),
            "verifier": getattr(self.loc.verifier, "sha256", None),
            "shortlister": getattr(self.loc.shortlister, "sha256", None),
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

    def _block(self, block, windows: list[WindowFix], heading: float | None) -> float | None:
        """One block of rows: the clock, the heading, the strip's motion input, then its windows (appended to
        ``windows``). Returns the heading used for the strip (``heading`` unchanged when the block fails before its
        heading is known); a failure is counted and recorded as an ``error`` record, not raised."""
        sid = block.meta.strip_id
        wall = time.time()
        self.clock.observe_data(float(block.meta.row_time_s(block.row0 + block.pixels.shape[0])), wall)
        try:
            h = self.autopilot.heading(block.meta)
            if block.meta.heading_deg is None and h is None:
                raise SarlocError(f"strip {sid}: no heading in its metadata and none from MAVLink; skipped")
            heading = block.meta.heading_deg if h is None else h
            self._strip_motion(block, heading)
            self._strip_course(block)
            batch = self.stream.push(block, h)
            if len(batch):
                windows.extend(self._windows(batch))
        except SarlocError as e:
            self.stats["errors"] += 1
            self.rec.write({"type": "error", "strip_id": sid, "error": str(e), "wall_s": time.time()})
            logger.error("%s", e)
        return heading

    def _finish(self, source: Any) -> None:
        """Whatever ended the loop: close the source, stop MAVLink (a last no-fix), write the ``stop`` record."""
        close = getattr(source, "close", None)
        if close:
            close()
        mavlink_stats = self.autopilot.stop()  # the sender sends a last no-fix
        if mavlink_stats is not None:
            self.stats["mavlink"] = mavlink_stats
        self.stats["nav"] = dict(self.nav.stats)
        if self.cfg.gnss_aiding:
            self.stats["gnss_aiding"] = dict(self.autopilot.gnss_stats)
        if self.cfg.nav.gnss_velocity_sigma_mps > 0:
            self.stats["gnss_velocity"] = dict(self.autopilot.velocity_stats)
        if self.cfg.motion == "velocity" and self.cfg.flow_correction_s > 0:
            self.stats["flow_correction"] = dict(self.autopilot.flow_stats)
        ts = self.autopilot.turn_slip
        if ts.n:
            self.stats["turn_slip"] = {"samples": ts.n, "deg": round(math.degrees(ts.slip_rad), 2), "used": ts.learnt}
        self.stats["output"] = self.autopilot.availability()
        self.stats["localizer"] = dict(self.loc.stats)
        if isinstance(source, Prefetcher):
            self.stats["blocks_dropped"] = source.dropped
        src_stats = getattr(getattr(source, "source", source), "stats", None)
        if src_stats is not None:
            self.stats["source"] = src_stats.as_dict() if hasattr(src_stats, "as_dict") else dict(src_stats)
        self.stats["record_errors"] = self.rec.errors
        if self.fatal:
            self.stats["fatal"] = self.fatal
        if self.corroboration is not None:
            self.stats.update({f"windows_{k}": v for k, v in self.corroboration.stats.items()})
        self.rec.write({"type": "stop", "stats": self.stats, "wall_s": time.time()})
        self.rec.close()

    def _end_strip(self, meta, windows: list[WindowFix], heading: float | None) -> None:
        self.stats["strips"] += 1
        self._fix(meta, windows, heading)

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


__all__ = [
    "CLOCKS",
    "MOTIONS",
    "WIND_PRIOR_SIGMA_MPS",
    "ClockMap",
    "Daemon",
    "Prefetcher",
    "Recorder",
    "RunConfig",
    "done_strips",
    "eas_to_tas",
    "load_run_config",
    "run",
]
