"""Simulated flights over real scenes with models held out from them (issue 6): simulate -> run -> report.

For a held-out scene S it assembles an export folder from the leave-one-scene-out runs:

* the encoder of ``runs/loso/S/<variant>/checkpoint.pt`` (trained without S), exported to ONNX;
* the shortlister, graph refiner and verifier of ``runs/refine/S/`` (``benchmarks/refine_loso.py``: trained on
  the other held-out scenes only, never on S);

builds a map pack from S's optical image, simulates a flight over S's SAR image (``sarloc simulate``), runs the
daemon over it and scores the fixes (``sarloc report``), with per-stage latency from the window records.

    python benchmarks/flight_loso.py --scene france_s1s2 --track curve
    python benchmarks/flight_loso.py --table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def assemble_export(scene: str, loso: Path, refine: Path, out: Path, variant: str = "none") -> Path:
    from sarloc.export.onnx import export_checkpoint

    if not (out / "sar_encoder.onnx").is_file():
        export_checkpoint(loso / scene / variant / "checkpoint.pt", out)
    src = refine / scene
    for a, b in (
        ("refiner_pool.onnx", "refiner.onnx"),
        ("refiner_pool.json", "refiner.json"),
        ("verifier_pool_gnn.json", "verifier.json"),
        ("shortlister.json", "shortlister.json"),
    ):
        shutil.copy2(src / a, out / b)
    return out


def _pack_and_flight(
    scene: str, data: Path, export: Path, d: Path, track: str, seed: int, n_strips: int | None, strip_px: int
) -> tuple[Path, Path]:
    """The map pack of S's optical image and the simulated flight over S (each made unless already there)."""
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.flight import simulate_flight

    pack = d / "pack"
    if not (pack / "pack.json").is_file():
        build_map_pack(data / scene, export / "optical_encoder.onnx", pack, MapPackConfig())
    flight = d / f"flight_{track}_s{seed}"
    if not (flight / "truth.json").is_file():
        simulate_flight(
            data / scene,
            flight,
            track=track,
            n_strips=n_strips,
            seed=seed,
            strip_width_px=strip_px,
            strip_rows=strip_px,
            force=True,
        )
    return pack, flight


def _run_daemon(flight: Path, export: Path, pack: Path, run_dir: Path, prior_radius_m: float | None) -> dict:
    """The daemon over the flight, records in a fresh ``run_dir``; returns its stats."""
    from sarloc.runtime.daemon import load_run_config, run

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_run_config(
        None,
        source=f"dir://{flight}",
        export=str(export),
        pack=str(pack),
        out=str(run_dir),
        follow=False,
        prior_radius_m=prior_radius_m,
    )
    return run(cfg, install_signals=False)


def _window_latency(wins: list[dict]) -> dict:
    """p50/p95/p99 ms of each stage of the window records, and of their sum."""
    stages = sorted({k for w in wins for k in w["stage_ms"]})
    lat = {
        k: {p: float(np.percentile([w["stage_ms"][k] for w in wins if k in w["stage_ms"]], p)) for p in (50, 95, 99)}
        for k in stages
    }
    tot = [sum(w["stage_ms"].values()) for w in wins]
    lat["total"] = {p: float(np.percentile(tot, p)) for p in (50, 95, 99)}
    return lat


def _window_errors(wins: list[dict], truth: dict) -> tuple[list[float], list[float]]:
    """Window-level accuracy: the error of each window's implied vehicle position, of all and of trusted ones."""
    from sarloc.eval.report import truth_at

    werr = [
        float(np.hypot(*(np.asarray(w["vehicle_xy_m"]) - truth_at(truth, w["t_s"]))))
        for w in wins
        if w["vehicle_xy_m"] is not None
    ]
    tw = [e for e, w in zip(werr, [w for w in wins if w["vehicle_xy_m"] is not None], strict=True) if w["trusted"]]
    return werr, tw


def fly(
    scene: str,
    data: Path,
    loso: Path,
    refine: Path,
    out: Path,
    track: str,
    seed: int,
    n_strips: int | None,
    strip_px: int,
    prior_radius_m: float | None,
) -> dict:
    from sarloc.core.scene import load_scene
    from sarloc.eval.report import format_report, load_fixes, load_truth, plot_track, score_fixes

    d = out / scene
    export = assemble_export(scene, loso, refine, d / "export")
    pack, flight = _pack_and_flight(scene, data, export, d, track, seed, n_strips, strip_px)
    tag = f"{track}_s{seed}" + (f"_prior{prior_radius_m:.0f}" if prior_radius_m else "")
    run_dir = d / f"run_{tag}"
    stats = _run_daemon(flight, export, pack, run_dir, prior_radius_m)
    truth = load_truth(flight / "truth.json")
    fixes, _ = load_fixes(run_dir / "records.jsonl")
    rep = score_fixes(fixes, truth)
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    wins = [r for r in recs if r["type"] == "window"]
    lat = _window_latency(wins)
    werr, tw = _window_errors(wins, truth)  # windows whose implied vehicle position is within 50 m of the truth
    sc = load_scene(data / scene)
    plot = plot_track(fixes, truth, sc.optical_gray, sc.frame, d / f"track_{tag}.png")
    res = {
        "scene": scene,
        "track": track,
        "seed": seed,
        "prior_radius_m": prior_radius_m,
        "report": rep,
        "latency_ms": lat,
        "windows": len(wins),
        "windows_within_50m": float(np.mean(np.array(werr) <= 50)),
        "trusted_windows": len(tw),
        "trusted_windows_within_50m": float(np.mean(np.array(tw) <= 50)) if tw else None,
        "daemon": {k: v for k, v in stats.items() if not isinstance(v, dict)},
        "filter": stats.get("filter"),
        "plot": str(plot),
        "gsd_m": sc.gsd_m,
        "map_px": [sc.width_px, sc.height_px],
    }
    (d / f"flight_{tag}.json").write_text(json.dumps(res, indent=1))
    print(format_report(rep))
    print(json.dumps({k: v for k, v in res.items() if k not in ("report",)}, indent=1))
    return res


def table(out: Path) -> str:
    lines = [
        "| scene | track | prior | strips | trusted fixes | median err (m) | p90 (m) | <=50 m | false fixes | "
        "windows <=50 m | ms/window p50 / p95 |",
        "|---" * 11 + "|",
    ]
    for p in sorted(out.glob("*/flight_*.json")):
        r = json.loads(p.read_text())
        rep, lat = r["report"], r["latency_ms"]["total"]

        def f(v, fmt="{:.0f}"):
            return "-" if v is None else fmt.format(v)

        lines.append(
            f"| {r['scene']} | {r['track']} | {f(r['prior_radius_m'])} | {rep['n_records']} | {rep['n_trusted']} | "
            f"{f(rep['median_m'])} | {f(rep['p90_m'])} | {f(rep['within_50_pct'], '{:.0f} %')} | "
            f"{f(rep['false_fix_rate'], '{:.2f}')} | {r['windows_within_50m']:.2f} | {lat[50]:.0f} / {lat[95]:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", default="france_s1s2")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--loso", type=Path, default=Path("runs/loso"))
    ap.add_argument("--refine", type=Path, default=Path("runs/refine"))
    ap.add_argument("--out", type=Path, default=Path("runs/flights"))
    ap.add_argument("--track", default="curve", choices=["straight", "lawnmower", "curve"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-strips", type=int)
    ap.add_argument("--strip-px", type=int, default=160)
    ap.add_argument("--prior-radius-m", type=float)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.out))
        return 0
    fly(a.scene, a.data, a.loso, a.refine, a.out, a.track, a.seed, a.n_strips, a.strip_px, a.prior_radius_m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
