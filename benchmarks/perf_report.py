"""``docs/performance.md`` and its plots from the benchmark JSON (every input optional).

    python benchmarks/perf_report.py                                   # the defaults below -> docs/performance.md
    python benchmarks/perf_report.py --out /tmp/perf.md --figures /tmp/perf_figures

Runs no benchmark: ``make bench`` runs the CPU suite into ``runs/bench`` and ``runs/bench_search``, then this.
Reads, each when present (a missing one turns its section into "not run: <command>"):

* ``RUNS/latency.json`` (``benchmarks/bench_latency.py``): per-stage pipeline latency, encoder backends x batch,
  memory, map-size scaling;
* ``RUNS/limits.json`` (``benchmarks/bench_limits.py``): measured numbers beside their physical floors;
* ``--search`` (``benchmarks/bench_search.py``): search latency and recall against the number of tiles;
* ``--export`` (``benchmarks/bench_export.py``): INT8 against FP32 (accuracy, size, latency);
* ``--refine`` ``<scene>/refine_eval.json`` (``benchmarks/refine_loso.py``) with the classical CFOG baseline of
  ``--loso`` ``<scene>/cfog/eval.json`` (``benchmarks/loso.py``): held-out accuracy, confidence calibration;
* ``--flights`` ``<scene>/flight_*.json`` (``benchmarks/flight_loso.py``): simulated flights over held-out scenes
  (numbers only: the real scenes are research-only data and no image of them is published);
* ``--demo`` / ``--demo-track`` (``sarloc demo``): the flight demo over a generated scene, with its track plot;
* ``RUNS/gpu_check.json`` (``benchmarks/gpu_check.sh``): the GPU check, when a GPU was lent.

Plots go to ``--figures`` as ``perf_*.png`` (matplotlib Agg, no timestamps: same inputs, same bytes). The document
starts with a summary of the headline numbers against the targets, then one section per input, each with the
command that produced its data and the machine it ran on. The sections are rendered by ``benchmarks/report/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests): the renderer lies beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Inputs, build


def inputs(a: argparse.Namespace) -> Inputs:
    """The JSON locations from the parsed arguments."""
    runs = Path(a.runs)
    gpu = [Path(a.gpu)] if a.gpu else [runs / "gpu_check.json", Path("runs/gpu/gpu_check.json")]
    if a.gpu_archive:  # last: the committed copy of a run on a GPU lent to an earlier task
        gpu.append(Path(a.gpu_archive))
    return Inputs(
        runs=runs,
        search=Path(a.search),
        export=[Path(p) for p in a.export],
        refine=Path(a.refine),
        loso=Path(a.loso),
        flights=Path(a.flights),
        demo=Path(a.demo),
        demo_track=Path(a.demo_track) if a.demo_track else None,
        gpu=gpu,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--runs", default="runs/bench", help="the suite's folder: latency.json, limits.json, gpu_check.json")
    p.add_argument("--search", default="runs/bench_search/results.json", help="bench_search.py results")
    p.add_argument(
        "--export",
        nargs="+",
        default=["runs/bench_export_idle/results.json", "runs/bench_export/results.json"],
        help="bench_export.py results; the first that exists is used",
    )
    p.add_argument("--refine", default="runs/refine", help="folder of <scene>/refine_eval.json")
    p.add_argument("--loso", default="runs/loso", help="folder of <scene>/cfog/eval.json (classical baseline)")
    p.add_argument("--flights", default="runs/flights", help="folder of <scene>/flight_*.json")
    p.add_argument("--demo", default="runs/demo/report.json", help="sarloc demo report")
    p.add_argument("--demo-track", default="runs/demo/track.png", help="the demo's track plot (generated scene)")
    p.add_argument("--gpu", default=None, help="gpu_check.json (default: RUNS/gpu_check.json, else runs/gpu/)")
    p.add_argument(
        "--gpu-archive",
        default="docs/data/gpu_h200/gpu_check.json",
        help="used when no fresh gpu_check.json is found ('' for none); its gpu_train/ folder too",
    )
    p.add_argument("--out", default="docs/performance.md")
    p.add_argument("--figures", default="docs/figures", help="where the perf_*.png plots go")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: write the markdown document and its figures; print what was written."""
    a = parser().parse_args(argv)
    out = Path(a.out)
    text, figures = build(inputs(a), out, Path(a.figures))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    for f in figures:
        print(f"wrote {f} ({f.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
