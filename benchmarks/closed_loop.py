"""Closed-loop flights with ArduPilot SITL: the autopilot navigates on sarloc alone after GNSS is denied.

    python benchmarks/closed_loop.py --vehicle plane --out runs/closed_loop/plane_synth
    python benchmarks/closed_loop.py --vehicle plane --scene ../shared/data/india_sih1733_1 --place 28.6 77.2 \
        --half-size-m 3000 --out runs/closed_loop/plane_india
    python benchmarks/closed_loop.py --analyse runs/closed_loop/plane_synth     # numbers and plots again

Without ``--scene`` a generated scene is made (``sarloc.sim.scenes``, seed 21, 1024 x 1024 px at 10 m: 10 x 10 km). The
model is the shipped demo model (trained on generated scenes only: it never saw any real scene). Prints the result
JSON (also ``OUT/result.json``) and writes ``OUT/track.png`` and ``OUT/error.png``. Needs ``../shared/sitl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sarloc.core.errors import SarlocError


def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def results_table(results: list[dict]) -> str:
    """One row per flight: the numbers the closed loop is judged by."""
    rows = [
        "| flight | GNSS-denied | switch to sarloc | EKF warnings | availability "
        "| autopilot error, mission: median / p99 | return home: median / p99 | sent position: median "
        "| false fixes | fix latency (median) | EKF GPS glitching: mission / return (raised) | returned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gsd = r.get("map_gsd_m") or 1.0
        m = r.get("autopilot_error_mission_m") or r.get("autopilot_error_m") or {}
        h = r.get("autopilot_error_rtl_m") or {}
        w = r.get("windows") or {}
        lat = (w.get("latency_acquisition_to_applied_s") or {}).get("median")
        sent = (r.get("sent_position_error_m") or {}).get("median")
        glitch = " / ".join(
            f"{_f(None if g.get('fraction') is None else g['fraction'] * 100, '{:.0f} %')} ({g.get('onsets', '-')})"
            for g in (r.get("ekf_gps_glitching") or {}, r.get("ekf_gps_glitching_rtl") or {})
        )
        rows.append(
            f"| {r['vehicle']}, {r['scene']} ({gsd:g} m px) | {_f(r.get('denied_s'), '{:.0f} s')} "
            f"| {_f(r.get('primary_gps_fix_after_denial_s'), '{:.2f} s')} "
            f"| {len(r.get('ekf_warnings_after_denial', []))} "
            f"| {_f((r.get('availability') or 0) * 100, '{:.1f} %')} "
            f"| {_f(m.get('median'))} / {_f(m.get('p99'))} m ({_f(m.get('median_px'))} / {_f(m.get('p99_px'))} px) "
            f"| {_f(h.get('median'))} / {_f(h.get('p99'))} m | {_f(sent)} m | {w.get('false_applied_gt5px', '-')} "
            f"of {w.get('applied', '-')} | {_f(lat, '{:.0f} s')} | {glitch} "
            f"| {'yes' if r.get('returned_home') else 'no'} |"
        )
    return "\n".join(rows)


def _params(items: list[str]) -> dict[str, float]:
    """``NAME=VALUE`` options (``--param``, ``--nav``, ``--fusion``) as a dict."""
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SarlocError(f"{it!r}: expected NAME=VALUE with a number, e.g. EK3_CHECK_SCALE=200") from None
        if not sep or not name.strip():
            raise SarlocError(f"{it!r}: expected NAME=VALUE")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vehicle", choices=["plane", "copter"], default="plane")
    p.add_argument("--scene", help="scene folder (default: a generated one)")
    p.add_argument("--out", default="runs/closed_loop/plane_synth")
    p.add_argument("--denied-s", type=float, default=600.0, help="GNSS-denied flight to plan for, seconds")
    p.add_argument("--half-size-m", type=float, help="half side of the mission rectangle (default 30 %% of the scene)")
    p.add_argument("--alt-m", type=float, default=150.0, help="mission altitude above home")
    p.add_argument("--instance", type=int, default=3, help="SITL -I (ports 5760 + 10 * I)")
    p.add_argument("--synth-px", type=int, default=1024, help="generated scene size, pixels")
    p.add_argument("--synth-gsd-m", type=float, default=10.0, help="generated scene metres per pixel")
    p.add_argument("--place", type=float, nargs=2, metavar=("LAT", "LON"), default=(47.3769, 8.5417),
                   help="where to put a scene without geo-reference (its centre; a synthetic placement)")  # fmt: skip
    p.add_argument("--rtl-hold-s", type=float, default=180.0, help="watch the vehicle this long after RTL")
    p.add_argument("--deny-after-s", type=float, default=30.0,
                   help="seconds on GNSS (sarloc running) from the mission's start to the denial")  # fmt: skip
    p.add_argument("--flow", action="store_true",
                   help="optical flow + rangefinder: EKF3's velocity from them (copter; fly below 60 m)")  # fmt: skip
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="an extra autopilot parameter")
    p.add_argument("--nav", action="append", default=[], metavar="KEY=VALUE", help="a daemon [nav] setting")
    p.add_argument("--fusion", action="append", default=[], metavar="KEY=VALUE", help="a daemon [fusion] setting")
    p.add_argument("--pack", help="an existing map pack of the scene's optical image (default: built under --out)")
    p.add_argument(
        "--gnss-aiding",
        action="store_true",
        help="the daemon's gnss_aiding: the autopilot's GNSS reaches its filter until the denial",
    )
    p.add_argument(
        "--motion", choices=["airspeed", "velocity", "flow", "strip", "auto"], help="the daemon's motion input"
    )
    p.add_argument("--analyse", metavar="OUT", help="only analyse a recorded flight")
    p.add_argument("--table", nargs="+", metavar="OUT", help="a markdown table of recorded flights' result.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s", datefmt="%X")
    from sarloc.sim.closed_loop import ClosedLoopConfig, analyse, run_closed_loop

    if a.table:
        print(results_table([json.loads((Path(d) / "result.json").read_text()) for d in a.table]))
        return 0
    try:
        if a.analyse:
            res = analyse(a.analyse)
        else:
            scene = a.scene
            if scene is None:
                from sarloc.sim.scenes import SynthConfig, write_scene

                scene = Path(a.out) / "synth_scene"
                if not (scene / "scene.json").is_file():
                    write_scene(
                        scene, SynthConfig(width_px=a.synth_px, height_px=a.synth_px, gsd_m=a.synth_gsd_m, seed=21)
                    )
            cfg = ClosedLoopConfig(
                scene=str(scene),
                out=a.out,
                vehicle=a.vehicle,
                denied_s=a.denied_s,
                half_size_m=a.half_size_m,
                alt_m=a.alt_m,
                instance=a.instance,
                place_lat_lon=tuple(a.place),
                rtl_hold_s=a.rtl_hold_s,
                motion=a.motion,
                deny_after_s=a.deny_after_s,
                pack=a.pack,
                flow=a.flow,
                extra_params=_params(a.param),
                nav=_params(a.nav),
                fusion=_params(a.fusion),
                gnss_aiding=a.gnss_aiding,
            )
            res = run_closed_loop(cfg)
    except SarlocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
