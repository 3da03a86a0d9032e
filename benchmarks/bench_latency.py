"""Latency benchmark of the onboard pipeline, per stage, on a generated flight (public API only).

    python benchmarks/bench_latency.py --out runs/bench                        # shipped demo model
    python benchmarks/bench_latency.py --export EXPORT --checkpoint CKPT       # + PyTorch eager in the same run

1. **Encoder**: ONNX Runtime FP32, ONNX Runtime INT8 (Q/DQ; calibrated here on generated scenes when the export
   has none) and PyTorch eager (with ``--checkpoint``), ms per window at batch 1/8/32/64, windows/s.
2. **Pipeline**: a simulated flight over a generated scene through every stage: window (cut + resample + rotate),
   preprocess, encode, search, shortlist, re-rank, register, verify, fuse (strip consensus + track filter), MAVLink
   encode (GPS_INPUT packing); p50/p95/p99 per window (fuse: per strip), resident memory.
3. **Scaling**: per-window end-to-end cost against map size (generated scenes of growing size, dense packs) and
   against the prior radius on the largest.

Writes ``OUT/latency.json`` (hardware, versions, artifact hashes, config) and prints tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _pct(xs) -> dict[str, float]:
    a = np.asarray(xs, float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}


def _hardware() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "system": platform.platform()}


def _versions() -> dict:
    import cv2
    import onnxruntime

    import sarloc

    v = {
        "sarloc": sarloc.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opencv": cv2.__version__,
    }
    try:
        import torch

        v["torch"] = torch.__version__
    except ImportError:
        pass
    return v


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def encoder_latency(
    export: Path, windows: np.ndarray, batches, repeats: int, threads: int, checkpoint: Path | None, work: Path
) -> dict:
    """ms per window of each encoder backend at each batch size (prepared windows, same inputs)."""
    from sarloc.backends.encoders import OrtEncoder
    from sarloc.core.preprocess import prepare_windows

    out: dict = {}
    fp32 = OrtEncoder(export / "sar_encoder.onnx", threads=threads)
    x_all = prepare_windows(windows, fp32.preprocess)
    fns = {"ort_fp32": fp32}
    int8 = export / "sar_encoder.int8.onnx"
    if not int8.is_file():
        int8 = _calibrated_int8(export, work)
    if int8 is not None:
        fns["ort_int8"] = OrtEncoder(int8, threads=threads)
    if checkpoint is not None:
        import torch

        from sarloc.trainer.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        model, _, _ = load_checkpoint(checkpoint)

        @torch.no_grad()
        def eager(x):
            return model.embed(torch.from_numpy(x), "sar").numpy()

        fns["torch_eager"] = eager
    for name, fn in fns.items():
        out[name] = {}
        for b in batches:
            x = x_all[:b] if len(x_all) >= b else np.concatenate([x_all] * (b // len(x_all) + 1))[:b]
            for _ in range(3):
                fn(x)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(x)
                ts.append((time.perf_counter() - t0) * 1e3 / b)
            p = _pct(ts)
            p["windows_per_s"] = 1e3 / p["p50"]
            out[name][str(b)] = p
    return out


def _calibrated_int8(export: Path, work: Path) -> Path | None:
    """An INT8 copy of the export, calibrated on generated scenes (never on research-only data)."""
    import shutil

    from sarloc.calib.quantize import calibrate_export
    from sarloc.sim.scenes import SynthConfig, write_scene

    dst = work / "export_int8"
    if (dst / "sar_encoder.int8.onnx").is_file():
        return dst / "sar_encoder.int8.onnx"
    dst.mkdir(parents=True, exist_ok=True)
    for f in export.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    scenes = [
        write_scene(work / "calib_scenes" / f"c{s}", SynthConfig(width_px=384, height_px=384, seed=s), force=True)
        for s in (301, 302)
    ]
    try:
        return calibrate_export(dst, scenes, n_per_scene=32)["sar"]
    except Exception as e:
        print(f"INT8 calibration failed ({e}); INT8 rows skipped", file=sys.stderr)
        return None


def _scene_pack_flight(work: Path, export: Path, size: int, seed: int, n_strips: int | None, track: str):
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.flight import simulate_flight
    from sarloc.sim.scenes import SynthConfig, write_scene

    d = work / f"scene{size}_s{seed}"
    if not (d / "scene" / "scene.json").is_file():
        write_scene(d / "scene", SynthConfig(width_px=size, height_px=size, seed=seed), force=True)
    if not (d / "pack" / "pack.json").is_file():
        build_map_pack(d / "scene", export / "optical_encoder.onnx", d / "pack", MapPackConfig(), progress=False)
    if not (d / "flight" / "truth.json").is_file():
        simulate_flight(
            d / "scene",
            d / "flight",
            track=track,
            n_strips=n_strips,
            seed=seed,
            strip_width_px=160,
            strip_rows=160,
            force=True,
        )
    return d


class _Tally:
    """What :func:`pipeline_latency` measures as the flight goes."""

    def __init__(self, rss_peak: float) -> None:
        self.rss_peak = rss_peak
        self.stages: dict[str, list[float]] = {}
        self.fuse_ms: list[float] = []
        self.mav_ms: list[float] = []
        self.totals: list[float] = []
        self.n_windows = 0
        self.strips = 0


def _localize(loc, filt, batch, cut: float, prior_radius_m: float | None, t_last: float, wins: list, tally: _Tally):
    """Localize one batch of windows (stages timed by the localizer), append its window fixes to ``wins`` and feed
    the trusted ones to the filter; returns the ms the filter took."""
    from sarloc.runtime.types import WindowFix

    prior = None
    if prior_radius_m is not None:
        st = filt.state(float(np.mean(batch.t_s)))
        prior = (float(st[0][0]), float(st[0][1])) if st is not None else None
    res = loc.localize(batch.windows, prior, prior_radius_m if prior else None)
    veh = batch.vehicle_xy_m(np.array([r.xy_m if r.xy_m else (np.nan, np.nan) for r in res]))
    for i, r in enumerate(res):
        for k, v in r.stage_ms.items():
            tally.stages.setdefault(k, []).append(v)
        tally.stages.setdefault("window", []).append(cut / len(res))
        tally.totals.append(sum(r.stage_ms.values()) + cut / len(res))
        wins.append(
            WindowFix(
                batch.strip_id,
                int(batch.index[i]),
                (0.0, 0.0),
                float(batch.t_s[i]),
                r.xy_m,
                None if r.xy_m is None else tuple(veh[i]),
                r.score,
                r.confidence,
                r.sigma_m,
                r.trusted,
            )
        )
    tally.n_windows += len(res)
    t0 = time.perf_counter()
    for w in wins[-len(res) :]:
        if w.trusted and w.vehicle_xy_m is not None:
            filt.add_fix(w.t_s, w.vehicle_xy_m, 2.0 * w.sigma_m, t_last)
    return (time.perf_counter() - t0) * 1e3


def _fuse_strip(block, wins: list, strip_id, filt, loc, t_last: float) -> float:
    """The strip consensus of a finished strip, fed to the filter; returns its ms."""
    from sarloc.runtime.fusion import FusionConfig, strip_consensus
    from sarloc.runtime.types import heading_vectors

    t0 = time.perf_counter()
    t_ref = float(np.mean([w.t_s for w in wins])) if wins else block.meta.t0_s
    fwd, _ = heading_vectors(block.meta.heading_deg)
    fix = strip_consensus(wins, t_ref, fwd * block.meta.speed_mps, FusionConfig(), strip_id, loc.tile_m)
    if fix.trusted:
        filt.add_consensus(fix.t_s, fix.xy_m, max(fix.sigma_h_m, 1.0), t_last)
    return (time.perf_counter() - t0) * 1e3


def _encode_state(filt, t_last: float, mav, mcfg) -> float:
    """The filter's estimate packed as GPS_INPUT; returns its ms."""
    from sarloc.runtime.mavlink import gps_input_fields
    from sarloc.runtime.types import NavState

    t0 = time.perf_counter()
    est = filt.estimate(t_last)
    st = NavState(t_last, False)
    if est is not None and est.valid:
        st = NavState(t_last, True, est.xy_m[1] / 1e5, est.xy_m[0] / 1e5, None, (*est.vel_mps[::-1], 0.0),
                      est.sigma_h_m, est.sigma_v_mps)  # fmt: skip
    f = gps_input_fields(st, mcfg)
    mav.gps_input_encode(**f).pack(mav)
    return (time.perf_counter() - t0) * 1e3


def pipeline_latency(export: Path, d: Path, prior_radius_m: float | None = None, max_strips: int | None = None):
    """Every stage of the daemon's loop, timed per window (fuse: per strip), on the flight in ``d``."""
    from pymavlink.dialects.v20 import ardupilotmega as mav2

    from sarloc.runtime.localizer import Localizer
    from sarloc.runtime.mavlink import MavlinkConfig
    from sarloc.runtime.navfilter import NavFilter
    from sarloc.runtime.sources import open_source
    from sarloc.runtime.types import heading_vectors
    from sarloc.runtime.windows import WindowStream

    loc = Localizer.from_paths(export, d / "pack", verify_pack=False)
    stream = WindowStream(map_gsd_m=loc.grid.gsd_m, window_px=loc.window_px, stride_px=32.0)
    filt = NavFilter()
    mav = mav2.MAVLink(None, srcSystem=1, srcComponent=191)
    mcfg = MavlinkConfig()
    tally = _Tally(rss_peak=_rss_mb())
    cur, wins, strip_fuse_ms = None, [], 0.0
    t_start = time.perf_counter()
    for block in open_source(f"dir://{d / 'flight'}", follow=False):
        if block.meta.strip_id != cur:
            cur, wins, strip_fuse_ms = block.meta.strip_id, [], 0.0
            stream.reset()
        fwd, _ = heading_vectors(block.meta.heading_deg)
        t_last = float(block.meta.row_time_s(block.row0 + block.pixels.shape[0]))
        filt.add_motion(t_last, "ground", tuple(fwd * block.meta.speed_mps))
        t0 = time.perf_counter()
        batch = stream.push(block)
        cut = (time.perf_counter() - t0) * 1e3
        if len(batch):
            strip_fuse_ms += _localize(loc, filt, batch, cut, prior_radius_m, t_last, wins, tally)
        if block.final:
            tally.strips += 1
            tally.fuse_ms.append(_fuse_strip(block, wins, cur, filt, loc, t_last) + strip_fuse_ms)
            tally.rss_peak = max(tally.rss_peak, _rss_mb())
            if max_strips and tally.strips >= max_strips:
                break
        tally.mav_ms.append(_encode_state(filt, t_last, mav, mcfg))
    wall = time.perf_counter() - t_start
    out = {
        "stages": {k: _pct(v) for k, v in tally.stages.items()},
        "total": _pct(tally.totals),
        "windows": tally.n_windows,
        "strips": tally.strips,
        "windows_per_s": tally.n_windows / wall,
        "wall_s": wall,
        "tiles": len(loc.pack),
        "map_px": list(loc.pack.basemap().shape),
    }
    out["stages"]["fuse"] = _pct(tally.fuse_ms)
    out["stages"]["mavlink_encode"] = _pct(tally.mav_ms)
    return out, tally.rss_peak


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path(__file__).resolve().parents[1] / "sarloc" / "demo_model")
    ap.add_argument("--checkpoint", type=Path, help="the export's checkpoint: adds PyTorch eager to the encoder table")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench/work"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 768, 1536], help="scene sides for the scaling part")
    ap.add_argument("--radii", type=float, nargs="+", default=[4000.0, 2000.0], help="prior radii on the largest")
    return ap.parse_args(argv)


def _encoder_windows(d: Path) -> np.ndarray:
    """64 windows cut from the first blocks of the flight in ``d``: the encoder benchmark's inputs."""
    from sarloc.runtime.sources import open_source
    from sarloc.runtime.windows import WindowStream

    st = WindowStream(map_gsd_m=10.0, window_px=64, stride_px=32.0)
    return np.concatenate(
        [st.push(s).windows for s in open_source(f"dir://{d / 'flight'}", follow=False, block_rows=4096)][:4]
    )[:64]


def _scaling_row(p: dict, map_px: int, radius: float | None) -> dict:
    return {
        "map_px": map_px,
        "n_tiles": p["tiles"],
        "prior_radius_m": radius,
        "search_ms_p50": p["stages"]["search"]["p50"],
        "search_ms_p99": p["stages"]["search"]["p99"],
        "end_to_end_ms_p50": p["total"]["p50"],
        "end_to_end_ms_p99": p["total"]["p99"],
    }


def _scaling(a: argparse.Namespace, rss_peak: float) -> tuple[list[dict], float]:
    """Per-window cost against map size (``--sizes``), then against the prior radius (``--radii``) on the largest."""
    scaling = []
    for size in a.sizes:
        ds = _scene_pack_flight(a.work, a.export, size, 40 + size % 97, 2, "straight")
        p, r = pipeline_latency(a.export, ds, max_strips=2)
        rss_peak = max(rss_peak, r)
        scaling.append(_scaling_row(p, size * size, None))
    for radius in a.radii:
        p, _ = pipeline_latency(a.export, ds, prior_radius_m=radius, max_strips=2)
        scaling.append(_scaling_row(p, a.sizes[-1] ** 2, radius))
    return scaling, rss_peak


def _meta(a: argparse.Namespace, t_all: float) -> dict:
    from sarloc.core.artifacts import sha256_file

    return {
        "hardware": _hardware(),
        "versions": _versions(),
        "command": " ".join(sys.argv),
        "artifacts": {f.name: sha256_file(f) for f in sorted(a.export.glob("*.onnx"))},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "total_s": time.perf_counter() - t_all,
    }


def _print_tables(a: argparse.Namespace, res: dict) -> None:
    enc, pipe, scaling, mem = res["encoder"], res["pipeline"], res["scaling"], res["memory"]
    print("| encoder | " + " | ".join(f"batch {b} ms/window (p50)" for b in a.batches) + " |")
    print("|---" * (len(a.batches) + 1) + "|")
    for name, rows in enc.items():
        print(f"| {name} | " + " | ".join(f"{rows[str(b)]['p50']:.2f}" for b in a.batches) + " |")
    print("\n| stage | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|")
    for k, v in {**pipe["stages"], "total (per window)": pipe["total"]}.items():
        print(f"| {k} | {v['p50']:.2f} | {v['p95']:.2f} | {v['p99']:.2f} |")
    print(
        f"\n{pipe['windows']} windows, {pipe['strips']} strips, {pipe['windows_per_s']:.1f} windows/s; "
        f"RSS {mem['rss_mb_start']:.0f} -> peak {mem['rss_mb_peak']:.0f} MB"
    )
    print("\n| map px | tiles | prior radius m | search p50 ms | end-to-end p50 ms |\n|---|---|---|---|---|")
    for s in scaling:
        print(
            f"| {s['map_px']} | {s['n_tiles']} | {s['prior_radius_m'] or '-'} | {s['search_ms_p50']:.2f} | "
            f"{s['end_to_end_ms_p50']:.1f} |"
        )
    print(f"wrote {a.out / 'latency.json'} in {res['meta']['total_s']:.0f} s")


def main(argv=None) -> int:
    a = _parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    from sarloc.core.artifacts import atomic_write_json

    rss0 = _rss_mb()
    t_all = time.perf_counter()
    d = _scene_pack_flight(a.work, a.export, 640, 7, 8, "curve")
    wins = _encoder_windows(d)
    enc = encoder_latency(a.export, wins, a.batches, a.repeats, a.threads, a.checkpoint, a.work)
    pipe, rss_peak = pipeline_latency(a.export, d)
    scaling, rss_peak = _scaling(a, rss_peak)
    res = {
        "meta": _meta(a, t_all),
        "encoder": enc,
        "pipeline": pipe,
        "memory": {"rss_mb_start": rss0, "rss_mb_peak": rss_peak, "rss_mb_end": _rss_mb()},
        "scaling": scaling,
    }
    atomic_write_json(a.out / "latency.json", res)
    _print_tables(a, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
