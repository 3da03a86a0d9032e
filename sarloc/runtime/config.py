"""Settings of the onboard daemon: :class:`RunConfig` and :func:`load_run_config` (a TOML file plus flags).

``sarloc run --config onboard.toml`` (every option also a flag) builds a :class:`RunConfig` and calls
:func:`sarloc.runtime.daemon.run`. Everything is validated here, the ``[mavlink]`` table included, so that a bad
value stops the daemon at start, not mid-flight.

Motion between fixes (``motion``): the autopilot's heading and airspeed (``airspeed``: ATTITUDE + VFR_HUD,
independent of the positions sarloc sends; the filter estimates the wind), the autopilot's ground velocity
(``velocity``: only with an independent velocity source such as optical flow; without GNSS and without one it
is built from sarloc's own positions and the loop drifts; with one, the positions sent still pull it, and where
the autopilot reports its optical flow the velocity is corrected by the flow's slow part, ``flow_correction_s``), the
autopilot's optical flow (``flow``: OPTICAL_FLOW rates and height above ground with the ATTITUDE, independent of
the positions sent), the strips' metadata (``strip``:
heading and along-track speed), or ``auto`` (airspeed when the autopilot reports it, else the strips).

Clock (``clock``, :class:`~sarloc.runtime.clockmap.ClockMap`): window times come from the strips' ``t0_s`` and row
rate. ``unix``: they are UNIX times from a clock synchronised with this computer's (checked against the autopilot's
SYSTEM_TIME when it is heard; a difference above ``max_clock_offset_s`` is logged); ``autopilot``: they are on the
autopilot's UNIX clock (SYSTEM_TIME), which "now" follows (a simulator running faster than real time); ``data``:
recorded data replayed, "now" is the newest acquisition time seen, advanced by the wall clock since; ``auto``:
``unix`` when the first strip is within 5 minutes of this computer's clock, else ``data``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from sarloc.core.config import build_dataclass, finite_number
from sarloc.core.errors import ConfigError, brief
from sarloc.runtime.fusion import FusionConfig
from sarloc.runtime.localizer import LocalizerConfig
from sarloc.runtime.navfilter import NavConfig


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
        motion: the motion input between fixes: ``auto``, ``airspeed``, ``velocity``, ``flow`` or ``strip`` (module
            docstring).
        flow_correction_s: ``motion = "velocity"``: where the autopilot reports an optical flow (OPTICAL_FLOW), the
            velocity is corrected by the flow's mean difference from it over this time constant, seconds: without
            GNSS the autopilot's velocity follows the positions sent, the flow does not (module docstring); 0: off.
        field_elevation_m: altitude above mean sea level of the take-off point; when set, the altitude sent is this
            plus the autopilot's own height above home (GLOBAL_POSITION_INT.relative_alt), else no altitude is sent
            (the autopilot then needs ``BARO_FIELD_ELV``, see docs/mavlink.md).
        gnss_aiding: while the autopilot's own GNSS receiver reports a 3-D fix (its GPS_RAW_INT or GPS2_RAW, the
            instance sarloc does not feed; ArduPilot), its fixes reach the navigation filter once a second: the
            filter learns the motion input's errors from them and a GNSS-denied flight starts from the GNSS
            position. A GNSS that keeps disagreeing with the track is dropped for the run. Needs ``[mavlink]``.
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
    flow_correction_s: float = 8.0
    field_elevation_m: float | None = None
    gnss_aiding: bool = False
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    nav: NavConfig = field(default_factory=NavConfig)
    mavlink_opts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SUB: dict[str, type[Any]] = {"localizer": LocalizerConfig, "fusion": FusionConfig, "nav": NavConfig}
_TABLES = ("localizer", "fusion", "nav", "mavlink")
CLOCKS = ("auto", "unix", "autopilot", "data")
MOTIONS = ("auto", "airspeed", "velocity", "flow", "strip")


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
    if not (fc.corroborate_px >= 0 and fc.corroborate_s > 0):
        raise ConfigError(f"{where} [fusion]: corroborate_px >= 0 (0 = off) and corroborate_s > 0")
    if cfg.clock not in CLOCKS:
        raise ConfigError(f"{where}: clock must be one of {', '.join(CLOCKS)}, got {cfg.clock!r}")
    if cfg.motion not in MOTIONS:
        raise ConfigError(f"{where}: motion must be one of {', '.join(MOTIONS)}, got {cfg.motion!r}")
    fcs = finite_number(cfg.flow_correction_s)
    if fcs is None or fcs < 0:
        raise ConfigError(f"{where}: flow_correction_s must be a number >= 0 (0 = off), got {cfg.flow_correction_s!r}")
    if not cfg.max_clock_offset_s > 0:
        raise ConfigError(f"{where}: max_clock_offset_s must be > 0, got {cfg.max_clock_offset_s!r}")
    if cfg.gnss_aiding and not cfg.mavlink:
        raise ConfigError(f"{where}: gnss_aiding reads the autopilot's GNSS over MAVLink: enable [mavlink] or drop it")
    return cfg
