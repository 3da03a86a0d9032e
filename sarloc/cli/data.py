"""Scenes and simulated flights: ``sarloc synth``, ``sarloc simulate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from sarloc.cli.common import add_command


def _cmd_synth(a: argparse.Namespace) -> int:
    from sarloc.sim.scenes import SynthConfig, write_scene

    cfg = SynthConfig(width_px=a.width_px, height_px=a.height_px, gsd_m=a.gsd_m, seed=a.seed)
    out = write_scene(Path(a.out), cfg, force=a.force)
    print(out)
    return 0


def _cmd_simulate(a: argparse.Namespace) -> int:
    from sarloc.sim.flight import simulate_flight

    out = simulate_flight(
        a.scene,
        a.out,
        track=a.track,
        heading_deg=a.heading_deg,
        strip_width_px=a.strip_width_px,
        strip_rows=a.strip_rows,
        n_strips=a.n_strips,
        gsd_m=a.gsd_m,
        speed_mps=a.speed_mps,
        seed=a.seed,
        speckle_looks=a.speckle_looks,
        prior_sigma_m=a.prior_sigma_m,
        force=a.force,
    )
    print(out)
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the synth, simulate subcommand(s) to ``sub``."""
    s = add_command(sub, "synth", common, "generate a synthetic co-registered SAR/optical scene folder")
    s.add_argument("--out", required=True, help="scene folder to create")
    s.add_argument("--width-px", type=int, default=768, help="scene width, pixels")
    s.add_argument("--height-px", type=int, default=768, help="scene height, pixels")
    s.add_argument("--gsd-m", type=float, default=10.0, help="metres per pixel")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    s.set_defaults(fn=_cmd_synth)

    s = add_command(sub, "simulate", common, "cut SAR strips along a flight path over a scene (with truth)")
    s.add_argument("--scene", required=True, help="scene folder to fly over (its SAR image)")
    s.add_argument("--out", required=True, help="flight folder to create (strips/, truth.json)")
    s.add_argument("--track", choices=["straight", "lawnmower", "curve"], default="straight", help="flight path shape")
    s.add_argument("--heading-deg", type=float, help="heading of the first leg, degrees from north (default: random)")
    s.add_argument("--strip-width-px", type=int, default=160, help="strip width (across track), pixels")
    s.add_argument("--strip-rows", type=int, default=256, help="rows (along track) per strip")
    s.add_argument("--n-strips", type=int, help="strips to cut (default: as many as fit)")
    s.add_argument("--gsd-m", type=float, help="strip metres per pixel (default: the scene's)")
    s.add_argument("--speed-mps", type=float, default=30.0, help="ground speed, m/s (sets the strips' row times)")
    s.add_argument("--speckle-looks", type=float, help="add multiplicative speckle with this many looks")
    s.add_argument("--prior-sigma-m", type=float, help="write a noisy INS prior of this sigma into the sidecars")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    s.set_defaults(fn=_cmd_simulate)
