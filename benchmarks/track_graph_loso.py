"""The graph over the candidates of consecutive windows against the hand-made strip consensus, leave-one-scene-out.

``collect``: for each held-out shared scene, a map pack of its optical image (the shipped demo model, which saw
none of these scenes), simulated flights over its SAR image (``sarloc simulate``: several tracks and seeds) and the
daemon over each flight; the window records carry every refined candidate of every window (``alternatives``).

``study``: per strip, the strip consensus the daemon recorded (its ``fix``) against the track graph
(:mod:`sarloc.eval.track_graph`: every candidate of the strip's windows, moved to the strip's reference time by
the strip geometry; trained on the other scenes' strips, its threshold set there). Both are scored against the
truth: trusted fixes, false fixes (trusted and more than 200 m off), with a paired comparison per strip.

    python benchmarks/track_graph_loso.py collect --out runs/track_graph
    python benchmarks/track_graph_loso.py study --out runs/track_graph --json docs/data/track_graph.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SCENES = ("china_shuguang", "france_s1s2", "india_sih1733_1", "india_sih1733_2", "india_sih1733_3")
FLIGHTS = tuple((("straight", "curve", "lawnmower")[i % 3], i) for i in range(24))


def collect_scene(scene: str, data: Path, out: Path, flights, n_strips: int) -> None:
    """Pack, flights and daemon runs of one scene under ``out/scene`` (each made unless already there)."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as DEMO_MODEL
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.runtime.daemon import load_run_config, run
    from sarloc.sim.flight import simulate_flight

    d = out / scene
    pack = d / "pack"
    if not (pack / "pack.json").is_file():
        build_map_pack(data / scene, Path(DEMO_MODEL) / "optical_encoder.onnx", pack, MapPackConfig())
    for track, seed in flights:
        flight = d / f"flight_{track}_s{seed}"
        run_dir = d / f"run_{track}_s{seed}"
        if (run_dir / "done").is_file():
            continue
        t0 = time.perf_counter()
        simulate_flight(data / scene, flight, track=track, n_strips=n_strips, seed=seed, strip_rows=160, force=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_run_config(
            None, source=f"dir://{flight}", export=str(DEMO_MODEL), pack=str(pack), out=str(run_dir), follow=False
        )
        stats = run(cfg, install_signals=False)
        (run_dir / "done").write_text(json.dumps({"windows": stats.get("windows"), "s": time.perf_counter() - t0}))
        print(
            f"{scene} {track} s{seed}: {stats.get('windows')} windows in {time.perf_counter() - t0:.0f} s", flush=True
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["collect", "study"])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("runs/track_graph"))
    ap.add_argument("--scenes", nargs="+", default=list(SCENES))
    ap.add_argument("--flights", type=int, default=len(FLIGHTS), help="flights per scene (tracks and seeds)")
    ap.add_argument("--n-strips", type=int, help="strips per flight (default: as many as fit)")
    ap.add_argument("--json", type=Path, help="study: write the results here")
    ap.add_argument("--layers", type=int, default=2, help="study: message-passing blocks (0: node features only)")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--unit", choices=["strip", "window"], default="strip", help="study: decide strips or windows")
    ap.add_argument("--no-geometry-features", action="store_true", help="study: without the support counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-scene", type=int, default=200, help="study: training graphs drawn per scene")
    a = ap.parse_args(argv)
    if a.step == "collect":
        for s in a.scenes:
            collect_scene(s, a.data, a.out, FLIGHTS[: a.flights], a.n_strips)
        return 0
    from sarloc.trainer.track_graph import TrackGraphConfig, study

    t0 = time.perf_counter()
    cfg = TrackGraphConfig(
        layers=a.layers,
        epochs=a.epochs,
        seed=a.seed,
        geometry_features=not a.no_geometry_features,
        max_strips_per_scene=a.max_per_scene,
    )
    res = study(a.out, a.scenes, cfg, unit=a.unit)
    res["seconds"] = time.perf_counter() - t0
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
