"""Flying: ``sarloc run`` (the onboard daemon) and ``sarloc demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sarloc.cli.common import add_command


def _cmd_run(a: argparse.Namespace) -> int:
    from sarloc.runtime.daemon import load_run_config, run

    over = {
        "source": a.source,
        "export": a.export,
        "pack": a.pack,
        "out": a.out,
        "backend": a.backend,
        "precision": a.precision,
        "stride_px": a.stride_px,
        "prior_radius_m": a.prior_radius_m,
        "max_strips": a.max_strips,
        "follow": False if a.no_follow else None,
        "resume": True if a.resume else None,
        "mavlink": True if a.mavlink else None,
        "mavlink.url": a.mavlink,
        "mavlink.signing_key_file": a.signing_key,
        "localizer.threshold": a.threshold,
    }
    cfg = load_run_config(a.config, **over)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}))
    print(f"records in {Path(cfg.out) / 'records.jsonl'}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    if a.make_model:
        from sarloc.demo import make_demo_model

        print(make_demo_model(steps=a.steps or 400))
        return 0
    from sarloc.demo import run_flight_demo

    rep = run_flight_demo(a.out, mavlink_url=None if a.no_mavlink else a.mavlink)
    print(f"report in {Path(a.out) / 'report.json'}" + (f", track plot {rep['plot']}" if rep.get("plot") else ""))
    print(f"demo took {rep['timings']['total_s']:.0f} s")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the run, demo subcommand(s) to ``sub``."""
    r = add_command(sub, "run", common, "the onboard daemon: strips in, fixes out (JSONL + MAVLink)")
    r.add_argument("--config", help="onboard.toml (flags override it)")
    r.add_argument("--source", help="dir://FOLDER, a strip file, udp://HOST:PORT or tcp://HOST:PORT")
    r.add_argument("--export", help="export folder (SAR encoder, refiner.onnx, verifier.json)")
    r.add_argument("--pack", help="map pack folder")
    r.add_argument("--out", help="output folder (records.jsonl)")
    r.add_argument(
        "--backend", choices=["auto", "ort", "trt"], help="inference backend (default: the config's, else ort)"
    )
    r.add_argument(
        "--precision", choices=["fp32", "int8", "fp16"], help="encoder precision (default: the config's, else fp32)"
    )
    r.add_argument("--stride-px", type=float, help="window spacing, map pixels")
    r.add_argument("--prior-radius-m", type=float, help="search around the track / INS prior (default: whole map)")
    r.add_argument("--threshold", type=float, help="window confidence threshold")
    r.add_argument("--max-strips", type=int, help="stop after this many strips")
    r.add_argument("--no-follow", action="store_true", help="dir:// source: stop when the folder is processed")
    r.add_argument("--resume", action="store_true", help="skip strips already fixed in OUT/records.jsonl")
    r.add_argument("--mavlink", metavar="URL", help="send MAVLink here (e.g. udpout:127.0.0.1:14550)")
    r.add_argument("--signing-key", help="MAVLink2 signing key file (32 bytes or 64 hex; mode 600)")
    r.set_defaults(fn=_cmd_run)

    d = add_command(sub, "demo", common, "fresh-machine main job: a simulated flight localised by the daemon (CPU)")
    d.add_argument("--out", default="runs/demo", help="demo folder")
    d.add_argument("--mavlink", default="udpout:127.0.0.1:14550", help="where the daemon sends MAVLink")
    d.add_argument("--no-mavlink", action="store_true", help="send no MAVLink")
    d.add_argument("--make-model", action="store_true", help="re-train the shipped demo model (needs sarloc[train])")
    d.add_argument("--steps", type=int, default=None, help="training steps (--make-model)")
    d.set_defaults(fn=_cmd_demo)
