"""The onboard daemon (torch-free): strips in, fixes out (JSONL records and MAVLink).

``sarloc run --config onboard.toml`` (every option also a flag) builds a :class:`RunConfig` and calls
:func:`run`. Per strip block: windows (north-up, on the pack grid) -> :class:`~sarloc.runtime.localizer.Localizer`
-> one JSONL ``window`` record each; at the strip's last block: strip consensus and the track filter
(:mod:`sarloc.runtime.fusion`) -> one ``fix`` record. A :class:`~sarloc.runtime.mavlink.MavlinkSender` thread sends
the filter's state, propagated to "now", at a steady rate; it sends no fix while the state is untrusted or stale.

Records (one JSON object per line, flushed at once, fsync'd at every strip end): ``start`` (config, artifact
hashes), ``window``, ``fix``, ``error``, ``stop`` (counters). Every line is written with a single ``write`` call in
append mode; a reader (:func:`sarloc.runtime.report.load_fixes`) tolerates a truncated last line after a crash.

Stopping: SIGTERM / SIGINT finish the current strip, write its fix, then stop (a second signal stops at once).
Restarting with ``resume = true`` skips strips that already have a ``fix`` record in the output.

Clock: the filter runs on the strips' own time stamps. The MAVLink thread maps wall-clock "now" to data time
through the offset observed when the latest strip was processed (on a live system the two clocks are the same
UNIX time and the offset is the processing latency; for a replay or a simulation it is whatever the data says).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from sarloc.errors import ConfigError, SarlocError, brief
from sarloc.runtime.fusion import FusionConfig, TrackFilter, strip_consensus
from sarloc.runtime.localizer import Localizer, LocalizerConfig
from sarloc.runtime.types import Fix, NavState, WindowFix, heading_vectors
from sarloc.typed_config import build_dataclass

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
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    mavlink_opts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SUB = {"localizer": LocalizerConfig, "fusion": FusionConfig}


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
    for k in ("localizer", "fusion", "mavlink"):
        if k in raw and not isinstance(raw[k], dict):
            raise ConfigError(f"{path or 'flags'}: '{k}' must be a table ([{k}]), got {type(raw[k]).__name__}")
    tables = {k: raw.pop(k) for k in ("localizer", "fusion", "mavlink") if k in raw}
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
    if fc.gate_m <= 0 or fc.min_inliers < 1 or fc.stale_after_s <= 0 or fc.max_sigma_m <= 0:
        raise ConfigError(f"{where} [fusion]: gate_m, stale_after_s, max_sigma_m > 0 and min_inliers >= 1")
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
        self.filter = TrackFilter(cfg.fusion)
        self.out = Path(cfg.out)
        self.records_path = self.out / "records.jsonl"
        self.skip = done_strips(self.records_path) if cfg.resume else set()
        self.rec = Recorder(self.records_path)
        self.stop_requested = threading.Event()
        self.stats = {
            "strips": 0,
            "windows": 0,
            "fixes": 0,
            "trusted_fixes": 0,
            "accepted_fixes": 0,
            "strips_skipped": 0,
            "errors": 0,
        }
        self._lock = threading.Lock()
        self._clock_offset_s: float | None = None  # data time - wall time at the last strip
        self._to_lonlat = None
        crs = self.loc.pack.metric_crs
        if crs is not None:
            import pyproj

            tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            self._to_lonlat = lambda x, y: tuple(float(v) for v in tr.transform(x, y))
        self.link = None
        self.sender = None

    # ------------------------------------------------------------------------------------------ MAVLink
    def nav_state(self, now_s: float) -> NavState:
        """The filter state at wall time ``now_s`` mapped to data time (see the module docstring)."""
        with self._lock:
            if self._clock_offset_s is None:
                return NavState(now_s, False)
            st = self.filter.nav_state(now_s + self._clock_offset_s, self._to_lonlat)
        return dataclasses.replace(st, t_s=now_s)

    def _start_mavlink(self) -> None:
        if not self.cfg.mavlink:
            return
        from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink, MavlinkSender

        self.link = MavlinkLink(MavlinkConfig(**self.cfg.mavlink_opts))
        self.sender = MavlinkSender(self.link, self.nav_state)
        self.sender.start()

    def _heading(self, meta) -> float | None:
        if meta.heading_deg is not None:
            return None  # the stream uses the metadata
        if self.link is not None:
            return self.link.heading_deg(max_age_s=2.0)
        return None

    # ------------------------------------------------------------------------------------------ per strip
    def _prior(self, meta, t_s: float) -> tuple[tuple[float, float] | None, float | None]:
        r = self.cfg.prior_radius_m
        if r is None:
            return None, None
        st = self.filter.state(t_s)
        if st is not None:
            x, p = st
            sig = float(np.sqrt(max(np.linalg.eigvalsh(p[:2, :2]).max(), 0.0)))
            return (float(x[0]), float(x[1])), max(r, 3 * sig)
        if meta.prior_xy_m is not None or meta.prior_lonlat_deg is not None:
            xy = meta.prior_xy_m or self.loc.pack.to_metric(*meta.prior_lonlat_deg)
            return (float(xy[0]), float(xy[1])), max(r, 3 * (meta.prior_sigma_m or 0.0))
        return None, None

    def _windows(self, batch, wall0: float) -> list[WindowFix]:
        meta = batch.meta
        t_mid = float(np.mean(batch.t_s)) if len(batch) else meta.t0_s
        prior, radius = self._prior(meta, t_mid)
        res = self.loc.localize(batch.windows, prior, radius)
        fixes = []
        xy = np.array([r.xy_m if r.xy_m is not None else (np.nan, np.nan) for r in res], float)
        veh = batch.vehicle_xy_m(xy)
        for i, r in enumerate(res):
            v = None if r.xy_m is None else (float(veh[i, 0]), float(veh[i, 1]))
            wf = WindowFix(
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
            fixes.append(wf)
            if self.cfg.record_windows:
                self.rec.write(
                    {
                        "type": "window",
                        **dataclasses.asdict(wf),
                        "prior_radius_m": radius,
                        "candidates": r.candidates,
                        "wall_s": time.time(),
                    }
                )
        self.stats["windows"] += len(res)
        return fixes

    def _fix(self, meta, windows: list[WindowFix], heading: float | None) -> Fix:
        t_ref = float(np.mean([w.t_s for w in windows])) if windows else meta.t0_s
        vel = None
        if heading is not None:
            fwd, _ = heading_vectors(heading)
            vel = fwd * meta.speed_mps
        fix = strip_consensus(windows, t_ref, vel, self.cfg.fusion, meta.strip_id, min_separation_m=self.loc.tile_m)
        with self._lock:
            accepted, why = self.filter.update(fix)
            self._clock_offset_s = t_ref - time.time()
        if fix.trusted and self._to_lonlat is not None and np.all(np.isfinite(fix.xy_m)):
            fix = dataclasses.replace(fix, lonlat_deg=self._to_lonlat(*fix.xy_m))
        self.stats["fixes"] += 1
        self.stats["trusted_fixes"] += int(fix.trusted)
        self.stats["accepted_fixes"] += int(accepted)
        st = self.filter.state(t_ref)
        filt = None
        if st is not None:
            filt = {
                "xy_m": [float(st[0][0]), float(st[0][1])],
                "vel_mps": [float(st[0][2]), float(st[0][3])],
                "sigma_h_m": float(np.sqrt(max(np.linalg.eigvalsh(st[1][:2, :2]).max(), 0.0))),
            }
        rec = {
            "type": "fix",
            **fix.to_dict(),
            "accepted": accepted,
            "filter_reason": why,
            "filter": filt,
            "wall_s": time.time(),
        }
        rec["xy_m"] = None if not np.all(np.isfinite(fix.xy_m)) else list(fix.xy_m)
        rec["sigma_h_m"] = _finite_or_none(fix.sigma_h_m)
        if not np.all(np.isfinite(np.asarray(fix.cov_xy_m2))):
            rec["cov_xy_m2"] = None
        self.rec.write(rec)
        self.rec.sync()
        logger.info(
            "strip %s: %s fix (%d/%d windows agree, conf %.2f) %s; filter: %s",
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
        self._start_mavlink()
        current: str | None = None
        windows: list[WindowFix] = []
        heading_used: float | None = None
        try:
            for block in source:
                sid = block.meta.strip_id
                if sid != current:
                    if self.stop_requested.is_set():
                        break
                    current, windows = sid, []
                    self.stream.reset()
                    heading_used = block.meta.heading_deg
                if sid in self.skip:
                    if block.final:
                        self.stats["strips_skipped"] += 1
                    continue
                try:
                    h = self._heading(block.meta)
                    if block.meta.heading_deg is None and h is None:
                        raise SarlocError(f"strip {sid}: no heading in its metadata and none from MAVLink; skipped")
                    heading_used = block.meta.heading_deg if h is None else h
                    batch = self.stream.push(block, h)
                    if len(batch):
                        windows += self._windows(batch, time.time())
                except SarlocError as e:
                    self.stats["errors"] += 1
                    self.rec.write({"type": "error", "strip_id": sid, "error": str(e), "wall_s": time.time()})
                    logger.error("%s", e)
                if block.final:
                    self.stats["strips"] += 1
                    self._fix(block.meta, windows, heading_used)
                    windows = []
                    if self.cfg.max_strips and self.stats["strips"] >= self.cfg.max_strips:
                        break
                    if self.stop_requested.is_set():
                        break
        finally:
            close = getattr(source, "close", None)
            if close:
                close()
            if self.sender is not None:
                self.sender.stop()
            if self.link is not None:
                self.stats["mavlink"] = dict(self.link.stats)
                self.link.close()
            self.stats["filter"] = dict(self.filter.stats)
            self.stats["localizer"] = dict(self.loc.stats)
            if isinstance(source, Prefetcher):
                self.stats["blocks_dropped"] = source.dropped
            src_stats = getattr(getattr(source, "source", source), "stats", None)
            if src_stats is not None:
                self.stats["source"] = src_stats.as_dict() if hasattr(src_stats, "as_dict") else dict(src_stats)
            self.stats["record_errors"] = self.rec.errors
            self.rec.write({"type": "stop", "stats": self.stats, "wall_s": time.time()})
            self.rec.close()
        return self.stats

    def request_stop(self, *_: Any) -> None:
        if self.stop_requested.is_set():
            raise KeyboardInterrupt
        logger.warning("stop requested: finishing the current strip")
        self.stop_requested.set()


def run(cfg: RunConfig, install_signals: bool = True) -> dict[str, Any]:
    """Run the daemon until the source ends, ``max_strips``, or SIGTERM/SIGINT. Returns the counters."""
    d = Daemon(cfg)
    if install_signals and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, d.request_stop)
        signal.signal(signal.SIGINT, d.request_stop)
    return d.run()


__all__ = ["Daemon", "Recorder", "RunConfig", "done_strips", "load_run_config", "run"]
