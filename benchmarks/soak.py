"""Soak test of the daemon: many windows through the full loop, resident memory and latency over time.

    python benchmarks/soak.py --windows 100000 --out runs/soak        # the reliability target (hours on 2 cores)
    python benchmarks/soak.py --windows 5000 --out runs/soak          # what CI-sized machines can afford

A simulated flight over a generated scene (shipped demo model) is replayed again and again as one endless stream
of strips (new strip ids and times each lap) through :class:`sarloc.runtime.daemon.Daemon`, with records on disk
and the MAVLink sender on (to a UDP port nobody listens to). Every strip: resident set size (RSS) and the time the
strip took per window. Writes ``OUT/soak.json`` and ``OUT/soak.png`` (RSS and ms/window against windows
processed) and prints the drift: RSS and latency of the last 10% of strips against the first 10% after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    ap.add_argument("--pool", type=int, default=200, help="shortlist pool (0: faster, no shortlist)")
    return ap.parse_args(argv)


def _flight(work: Path) -> None:
    """A generated scene, its map pack (shipped demo model) and a 12-strip curved flight, unless already there."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.flight import simulate_flight
    from sarloc.sim.scenes import SynthConfig, write_scene

    if not (work / "pack" / "pack.json").is_file():
        write_scene(work / "scene", SynthConfig(width_px=640, height_px=640, seed=7), force=True)
        build_map_pack(
            work / "scene", MODEL_DIR / "optical_encoder.onnx", work / "pack", MapPackConfig(), progress=False
        )
        simulate_flight(
            work / "scene",
            work / "flight",
            track="curve",
            n_strips=12,
            seed=7,
            strip_width_px=160,
            strip_rows=160,
            force=True,
        )


def _daemon(a: argparse.Namespace, work: Path):
    """The daemon over the flight: records (windows too) on disk, MAVLink to a port nobody listens to."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
    from sarloc.runtime.daemon import Daemon, load_run_config

    cfg = load_run_config(
        None,
        source=f"dir://{work / 'flight'}",
        export=str(MODEL_DIR),
        pack=str(work / "pack"),
        out=str(a.out / "run"),
        follow=False,
        record_windows=True,
        **{"mavlink.enabled": True, "mavlink.url": "udpout:127.0.0.1:9", "localizer.pool": a.pool},
    )
    (a.out / "run" / "records.jsonl").unlink(missing_ok=True)
    return Daemon(cfg)


def _endless(d, strips: list, lap_s: float, n_windows: int, samples: list[dict]):
    """The flight's strips lap after lap (new strip ids and times each lap) until the daemon has seen
    ``n_windows`` windows; at the end of every strip, a sample of RSS and ms per window goes to ``samples``. The
    clock of the first sample starts now, not at the first block."""
    import psutil

    proc = psutil.Process()
    state = {"t": time.perf_counter(), "w": 0}

    def gen():
        lap = 0
        while d.stats["windows"] < n_windows:
            for sf in strips:
                for block in sf.blocks(64):
                    meta = dataclasses.replace(
                        block.meta, strip_id=f"{block.meta.strip_id}_lap{lap}", t0_s=block.meta.t0_s + lap * lap_s
                    )
                    yield dataclasses.replace(block, meta=meta)
                    if block.final:
                        now, w = time.perf_counter(), d.stats["windows"]
                        if w > state["w"]:
                            samples.append(
                                {
                                    "windows": w,
                                    "rss_mb": proc.memory_info().rss / 2**20,
                                    "ms_per_window": (now - state["t"]) * 1e3 / (w - state["w"]),
                                    "t_s": now,
                                }
                            )
                        state.update(t=now, w=w)
                if d.stats["windows"] >= n_windows:
                    return
            lap += 1

    return gen()


def _summary(stats: dict, samples: list[dict], wall: float, pool: int) -> dict:
    """``soak.json``: the drift, the last 10 % of strips against the first 10 % after warm-up, and the samples."""
    n = len(samples)
    warm = samples[max(1, n // 10) :]
    k = max(1, len(warm) // 10)
    first, last = warm[:k], warm[-k:]

    def mean(rows, key):
        return float(np.mean([r[key] for r in rows]))

    return {
        "windows": stats["windows"],
        "strips": stats["strips"],
        "wall_s": wall,
        "pool": pool,
        "rss_mb_first": mean(first, "rss_mb"),
        "rss_mb_last": mean(last, "rss_mb"),
        "rss_mb_max": max(r["rss_mb"] for r in samples),
        "ms_per_window_first": mean(first, "ms_per_window"),
        "ms_per_window_last": mean(last, "ms_per_window"),
        "trusted_fixes": stats["trusted_fixes"],
        "fixes": stats["fixes"],
        "mavlink": stats.get("mavlink"),
        "record_errors": stats.get("record_errors"),
        "samples": samples,
    }


def _plot(out: Path, stats: dict, samples: list[dict]) -> None:
    """``soak.png``: RSS and ms/window against windows processed (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        w = [r["windows"] for r in samples]
        ax[0].plot(w, [r["rss_mb"] for r in samples])
        ax[0].set_ylabel("RSS (MB)")
        ax[1].plot(w, [r["ms_per_window"] for r in samples], lw=0.7)
        ax[1].set_ylabel("ms / window (per strip)")
        ax[1].set_xlabel("windows processed")
        fig.suptitle(f"soak: {stats['windows']} windows, {stats['strips']} strips")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=90)
    except ImportError:
        pass


def main(argv=None) -> int:
    from sarloc.runtime.strips import StripFile

    a = _parse_args(argv)
    work = a.out / "work"
    _flight(work)
    strips = [StripFile(p) for p in sorted((work / "flight").glob("strip_*.npy"))]
    lap_s = max(s.read().meta.t0_s for s in strips) - min(s.read().meta.t0_s for s in strips) + 60.0
    d = _daemon(a, work)
    samples: list[dict] = []
    blocks = _endless(d, strips, lap_s, a.windows, samples)
    t0 = time.perf_counter()
    stats = d.run(blocks)
    wall = time.perf_counter() - t0
    res = _summary(stats, samples, wall, a.pool)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak.json").write_text(json.dumps(res, indent=1))
    _plot(a.out, stats, samples)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
