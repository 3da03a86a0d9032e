"""``docs/performance.md`` and its plots from the benchmark JSON (every input optional).

    python benchmarks/perf_report.py                                   # the defaults below -> docs/performance.md
    python benchmarks/perf_report.py --out /tmp/perf.md --figures /tmp/perf_figures

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
command that produced its data and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEARCH_TARGET_TILES = 1_000_000
SEARCH_TARGET_MS = 10.0
SEARCH_TARGET_RECALL = 0.99
SEARCH_MIN_TILES = 10_000  # the exact-vs-FAISS target covers the scale sizes (10k, 100k, 1M)
CLASSICAL_TARGET_RATIO = 0.01  # encoder + search + refine per window vs the classical per-query time
INT8_TARGET_POINTS = 1.0  # INT8 R@1 may lose at most this many points against FP32

STAGE_ORDER = (
    "window",
    "preprocess",
    "encode",
    "search",
    "shortlist",
    "rerank",
    "register",
    "verify",
    "fuse",
    "mavlink_encode",
)
REFINE_STAGES = ("preprocess", "encode", "search", "shortlist", "rerank", "register", "verify")
BACKEND_ORDER = ("ort_fp32", "ort_int8", "torch_eager")
FULL_PATH = "shortlist+gnn+metric"
COARSE = "none"
METHODS = (
    "none",
    "qe",
    "kreciprocal",
    "spatial",
    "gnn",
    "none+metric",
    "gnn+metric",
    "shortlist",
    "shortlist+gnn",
    "shortlist+metric",
    "shortlist+gnn+metric",
)
LABELS = {
    "none": "coarse (no re-ranking)",
    "qe": "alpha query expansion",
    "kreciprocal": "k-reciprocal",
    "spatial": "spatial vote",
    "gnn": "graph refiner (GNN)",
    "none+metric": "coarse + metric verification",
    "gnn+metric": "GNN + metric verification",
    "shortlist": "pool + low-res shortlist",
    "shortlist+gnn": "pool + shortlist + GNN",
    "shortlist+metric": "pool + shortlist + metric verification",
    "shortlist+gnn+metric": "**full path** (pool + shortlist + GNN + metric verification)",
    "cfog": "classical CFOG (whole map)",
}
KINDS = ("arbitrary", "aligned")
DASH = "–"


# ---------------------------------------------------------------------------------------------- formatting


def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, null, NaN, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ms(x: Any) -> str:
    """Milliseconds with a precision that suits their size."""
    v = _num(x)
    if v is None:
        return DASH
    a = abs(v)
    return f"{v:.3f}" if a < 1 else f"{v:.2f}" if a < 10 else f"{v:.1f}" if a < 100 else f"{v:.0f}"


def _f(x: Any, nd: int = 2) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:.{nd}f}"


def _g(x: Any) -> str:
    """A generic number: integers as integers, others with 4 significant digits."""
    v = _num(x)
    if v is None:
        return DASH if x is None else str(x)
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _pct(x: Any, nd: int = 1) -> str:
    v = _num(x)
    return DASH if v is None else f"{100 * v:.{nd}f} %"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    rows = [[str(c) for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _cols(spec: str) -> list[str]:
    """Table header cells from ``"a|b|c"``."""
    return spec.split("|")


def _code(cmd: str) -> list[str]:
    return ["```bash", cmd, "```"]


def _machine(d: dict) -> str:
    """One line describing the machine and software from a JSON's hardware/host/meta/versions fields."""
    meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    hw = d.get("hardware") or meta.get("hardware") or d.get("host") or {}
    ver = d.get("versions") or meta.get("versions") or {}
    parts = []
    if isinstance(hw, dict) and hw:
        cpu = hw.get("cpu") or hw.get("cpu_model") or ""
        n = hw.get("cpus") or hw.get("cpu_count")
        mach = hw.get("machine") or ""
        gpu = hw.get("gpu") or hw.get("gpu_name") or hw.get("device")
        parts.append(", ".join(str(p) for p in (mach, cpu, f"{n} CPUs" if n else "", gpu or "") if p))
        extra = {k: v for k, v in hw.items() if k in ("python", "torch", "onnxruntime") and k not in ver}
        ver = {**extra, **ver} if isinstance(ver, dict) else extra
    if isinstance(ver, dict) and ver:
        parts.append(", ".join(f"{k} {v}" for k, v in ver.items() if isinstance(v, (str, int, float))))
    threads = d.get("omp_num_threads", meta.get("omp_num_threads"))
    if threads is not None:
        parts.append(f"OMP_NUM_THREADS={threads}")
    return "; ".join(p for p in parts if p) or "not recorded in the JSON"


def _load(path: Path | None) -> tuple[dict | None, str | None]:
    """(data, None), or (None, why) when the file is absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None, None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return None, f"could not read `{path}`: {e}"
    if not isinstance(data, dict):
        return None, f"`{path}` holds no JSON object"
    return data, None


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (commands stay copy-pasteable)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": 100})
    return plt


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version string: same inputs, same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What the sections contribute: summary rows and markdown, plus the figures written."""

    figures_dir: Path
    doc_dir: Path
    targets: list[tuple[str, str, str]] = field(default_factory=list)  # (target, measured, status)
    headlines: list[tuple[str, str, str]] = field(default_factory=list)  # (what, measured, source section)
    sections: list[list[str]] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def figure(self, name: str) -> Path:
        return self.figures_dir / name

    def image(self, path: Path, alt: str) -> str:
        self.figures.append(path)
        rel = os.path.relpath(Path(path).resolve(), Path(self.doc_dir).resolve())
        return f"![{alt}]({Path(rel).as_posix()})"


def _header(title: str, command: str, machine: str | None) -> list[str]:
    lines = ["", f"## {title}", "", "Command:", "", *_code(command)]
    if machine is not None:
        lines += ["", f"Machine: {machine}."]
    return lines


def _not_run(title: str, command: str, why: str | None = None) -> list[str]:
    return ["", f"## {title}", "", why or f"not run: `{command}`"] + (
        ["", f"To produce it: `{command}`"] if why else []
    )


# ------------------------------------------------------------------------------------------------- latency


def section_latency(rep: Report, path: Path, command: str) -> None:
    title = "Onboard pipeline latency (CPU)"
    rep.commands.append((title, command))
    d, err = _load(path)
    if d is None:
        rep.sections.append(_not_run(title, command, err))
        return
    meta = d.get("meta") or {}
    cmd = meta.get("command") or command
    if cmd.split(" ", 1)[0].endswith(".py"):  # sys.argv joined: the script comes first
        cmd = f"python {cmd}"
    out = _header(title, cmd, _machine(d))
    if meta.get("artifacts"):
        out += ["", "Artifacts (sha256): " + ", ".join(f"`{k}` {str(v)[:12]}" for k, v in meta["artifacts"].items())]

    pipe = d.get("pipeline") or {}
    stages = pipe.get("stages") or {}
    total = pipe.get("total") or {}
    if stages or total:
        names = [s for s in STAGE_ORDER if s in stages] + sorted(s for s in stages if s not in STAGE_ORDER)
        rows = [
            [s + (" (per strip)" if s == "fuse" else ""), *(_ms(stages[s].get(q)) for q in ("p50", "p95", "p99"))]
            for s in names
        ]
        if total:
            rows.append(["**total per window**", *(f"**{_ms(total.get(q))}**" for q in ("p50", "p95", "p99"))])
        out += ["", "### Per stage", "", *_table(["stage", "p50 ms", "p95 ms", "p99 ms"], rows)]
        facts = []
        if pipe.get("windows") is not None:
            facts.append(f"{_g(pipe['windows'])} windows")
        if pipe.get("strips") is not None:
            facts.append(f"{_g(pipe['strips'])} strips")
        if pipe.get("tiles") is not None:
            facts.append(f"{_g(pipe['tiles'])} map tiles")
        if pipe.get("windows_per_s") is not None:
            facts.append(f"{_f(pipe['windows_per_s'], 1)} windows/s end to end (one process)")
        if facts:
            out += ["", ", ".join(facts) + "."]
        ref = [s for s in REFINE_STAGES if s in stages and _num(stages[s].get("p50")) is not None]
        if ref:
            ssum = sum(float(stages[s]["p50"]) for s in ref)
            out += [
                "",
                f"Encoder + search + refine ({' + '.join(ref)}) sum of p50: **{_ms(ssum)} ms per window** "
                "(on the generated map of this run; the target compares with the classical baseline on the same map, "
                "see the accuracy section).",
            ]
        if names:
            out += ["", rep.image(_plot_stages(rep, names, stages), "per-stage p50 latency with p95 whiskers")]
        if _num(total.get("p50")) is not None:
            tput = f", {_f(pipe.get('windows_per_s'), 1)} windows/s" if _num(pipe.get("windows_per_s")) else ""
            rep.headlines.append(
                (
                    "pipeline latency per window (CPU)",
                    f"p50 {_ms(total['p50'])} ms, p99 {_ms(total.get('p99'))} ms{tput}",
                    title,
                )
            )

    enc = d.get("encoder") or {}
    if enc:
        backends = [b for b in BACKEND_ORDER if b in enc] + sorted(b for b in enc if b not in BACKEND_ORDER)
        batches = sorted({int(k) for b in backends for k in (enc[b] or {}) if str(k).isdigit()})
        rows = []
        for b in backends:
            cells = []
            for n in batches:
                r = (enc[b] or {}).get(str(n)) or {}
                wps = _num(r.get("windows_per_s"))
                cells.append(f"{_ms(r.get('p50'))} ({_g(round(wps)) if wps else DASH}/s)" if r else DASH)
            rows.append([b, *cells])
        out += [
            "",
            "### Encoder backends",
            "",
            "ms per window, p50 (windows/s in brackets), same prepared windows for every backend:",
            "",
            *_table(["backend", *(f"batch {n}" for n in batches)], rows),
        ]
        if "ort_fp32" in enc:
            ratios = []
            for b, label in (("ort_int8", "INT8 / FP32"), ("torch_eager", "PyTorch eager / ORT FP32")):
                if b not in enc:
                    continue
                cells = []
                for n in batches:
                    x = _num(((enc[b] or {}).get(str(n)) or {}).get("p50"))
                    y = _num(((enc["ort_fp32"] or {}).get(str(n)) or {}).get("p50"))
                    cells.append(f"{x / y:.2f}x" if x is not None and y else DASH)
                ratios.append([label, *cells])
            if ratios:
                out += [
                    "",
                    "Ratios of p50 ms per window (below 1: faster than ONNX Runtime FP32):",
                    "",
                    *_table(["ratio", *(f"batch {n}" for n in batches)], ratios),
                ]

    mem = d.get("memory") or {}
    if mem:
        out += [
            "",
            "Resident memory: "
            + ", ".join(f"{k.replace('rss_mb_', '')} {_f(v, 0)} MB" for k, v in mem.items() if _num(v) is not None)
            + ".",
        ]

    scaling = d.get("scaling") or []
    if scaling:
        rows = [
            [
                _g(s.get("map_px")) if s.get("map_px") is not None else DASH,
                _g(s.get("n_tiles")),
                _g(s.get("prior_radius_m")) if s.get("prior_radius_m") is not None else "none",
                _ms(s.get("search_ms_p50")),
                _ms(s.get("search_ms_p99")),
                _ms(s.get("end_to_end_ms_p50")),
                _ms(s.get("end_to_end_ms_p99")),
            ]
            for s in scaling
        ]
        out += [
            "",
            "### Scaling with the map",
            "",
            *_table(
                _cols("map px|tiles|prior radius m|search p50 ms|search p99 ms|end-to-end p50 ms|end-to-end p99 ms"),
                rows,
            ),
        ]
    rep.sections.append(out)


def _plot_stages(rep: Report, names: list[str], stages: dict) -> Path:
    plt = _plt()
    p50 = np.array([_num(stages[s].get("p50")) or 0.0 for s in names])
    p95 = np.array([_num(stages[s].get("p95")) or v for s, v in zip(names, p50, strict=True)])
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    ax.barh(
        y,
        p50,
        xerr=[np.zeros_like(p50), np.maximum(p95 - p50, 0)],
        color="#4C72B0",
        capsize=3,
        error_kw={"elinewidth": 1},
    )
    for yi, v, w in zip(y, p50, p95, strict=True):
        ax.text(max(v, w), yi, f"  {_ms(v)} / {_ms(w)}", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, [s + (" /strip" if s == "fuse" else "") for s in names])
    ax.set_xlabel("ms per window (bar and first label: p50; whisker and second label: p95)")
    ax.set_title("Pipeline latency per stage")
    ax.set_xlim(0, max(float(p95.max()), 1e-3) * 1.35)
    return _save(fig, rep.figure("perf_latency_stages.png"))


# -------------------------------------------------------------------------------------------------- limits


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Numeric leaves of nested dicts as (dotted name, value); lists of row dicts are skipped (shown as tables)."""
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if k in NOT_NUMBERS:
                continue
            if isinstance(v, dict):
                out += _flatten(v, name)
            elif _num(v) is not None:
                out.append((name, v))
    return out


def _row_lists(d: Any, prefix: str = "") -> list[tuple[str, list[dict]]]:
    """Lists of dicts found anywhere in ``d`` (e.g. ``encoder.rows``, ``search.rows``)."""
    out: list[tuple[str, list[dict]]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                out.append((name, v))
            elif isinstance(v, dict):
                out += _row_lists(v, name)
    return out


LIMIT_COLUMNS = (
    ("what", "what"),
    ("measured_ms", "measured ms"),
    ("floor_1t_ms", "floor ms (1 thread)"),
    ("floor_all_ms", "floor ms (all threads)"),
    ("ratio_1t", "measured / floor (1 thread)"),
    ("ratio_all", "measured / floor (all)"),
    ("floor_kind", "bound by"),
)
NOT_NUMBERS = ("hardware", "versions", "config", "sources", "meta", "total_s")


def section_limits(rep: Report, path: Path, command: str) -> None:
    title = "Measured vs physical floor"
    rep.commands.append((title, command))
    d, err = _load(path)
    if d is None:
        rep.sections.append(_not_run(title, command, err))
        return
    out = _header(title, command, _machine(d))
    out += [
        "",
        "A floor is what no implementation on this machine can beat: FLOPs / measured GEMM peak (compute) or bytes "
        "read / measured memory bandwidth (a full-scan search). The ratio says how far above it the measured time is.",
    ]
    body = {k: v for k, v in d.items() if k not in NOT_NUMBERS}
    for name, rows in _row_lists(body):
        keys = [k for k, _ in LIMIT_COLUMNS if any(k in r for r in rows)]
        if keys:
            labels = dict(LIMIT_COLUMNS)
            header = [labels[k] for k in keys]
            cells = [[_fmt_limit(k, r.get(k)) for k in keys] for r in rows]
        else:
            keys = sorted({k for r in rows for k, v in r.items() if _num(v) is not None or isinstance(v, str)})
            header, cells = keys, [[_g(r.get(k)) for k in keys] for r in rows]
        out += ["", f"**{name.removesuffix('.rows')}**", "", *_table(header, cells)]
    scalars = _flatten(body)
    if scalars:
        out += ["", "**quantities**", "", *_table(["quantity", "value"], [[f"`{k}`", _g(v)] for k, v in scalars])]
    rep.sections.append(out)


def _fmt_limit(key: str, v: Any) -> str:
    if key == "what" or key == "floor_kind":
        return DASH if v is None else str(v)
    if key.startswith("ratio"):
        return DASH if _num(v) is None else f"{_num(v):.2f}x"
    return _ms(v)


# -------------------------------------------------------------------------------------------------- search


def _search_command(d: dict, default: str) -> str:
    c = d.get("config") or {}
    if not c:
        return default
    parts = ["python benchmarks/bench_search.py"]
    for key, flag in (
        ("sizes", "--sizes"),
        ("dims", "--dims"),
        ("queries", "--queries"),
        ("threads", "--threads"),
        ("prior_radius_m", "--prior-radius-m"),
        ("out", "--out"),
    ):
        v = c.get(key)
        if v is None:
            continue
        parts.append(f"{flag} {' '.join(str(x) for x in v) if isinstance(v, list) else v}")
    return " ".join(parts)


def _meets_search(r: dict) -> bool:
    p50, rec = _num(r.get("p50_ms")), _num(r.get("recall@10"))
    return p50 is not None and rec is not None and p50 <= SEARCH_TARGET_MS and rec >= SEARCH_TARGET_RECALL


def section_search(rep: Report, path: Path, command: str) -> None:
    title = "Map search scaling"
    target = f"{SEARCH_TARGET_TILES:,}-tile search <= {SEARCH_TARGET_MS:g} ms at recall@10 >= {SEARCH_TARGET_RECALL}"
    rep.commands.append((title, command))
    d, err = _load(path)
    results = [r for r in (d or {}).get("results", []) if isinstance(r, dict)]
    if d is None or not results:
        rep.sections.append(_not_run(title, command, err))
        rep.targets.append((target, "not measured", "not measured"))
        return
    out = _header(title, _search_command(d, command), _machine(d))
    cfg = d.get("config") or {}
    if cfg:
        out += [
            "",
            f"{_g(cfg.get('queries'))} queries per pack (half at 1M tiles), query noise {_g(cfg.get('query_noise'))}, "
            f"prior radius {_g(cfg.get('prior_radius_m'))} m, {_g(cfg.get('threads'))} thread(s), "
            f"scorer `{cfg.get('scorer', DASH)}` (kernel `{results[0].get('kernel', DASH)}`). Recall@10 is against "
            "the exact search (see the notes).",
        ]
    dims = sorted({r.get("dim") for r in results if r.get("dim") is not None}, reverse=True) or [None]
    methods = list(dict.fromkeys(str(r.get("method")) for r in results))
    notes: dict[str, str] = {}
    for dim in dims:
        rows = []
        for r in sorted(
            (r for r in results if r.get("dim") == dim),
            key=lambda r: (r.get("n_tiles") or 0, methods.index(str(r.get("method")))),
        ):
            m = str(r.get("method"))
            if r.get("note"):
                notes.setdefault(m, str(r["note"]))
            at_target = r.get("n_tiles") == SEARCH_TARGET_TILES
            extra = [f"{k}={_g(r[k])}" for k in ("nlist", "nprobe", "prior_radius_m") if r.get(k) is not None]
            rows.append(
                [
                    _g(r.get("n_tiles")),
                    m + (f" ({', '.join(extra)})" if extra else ""),
                    _ms(r.get("p50_ms")),
                    _ms(r.get("p99_ms")),
                    _f(r.get("recall@10"), 3),
                    _g(r.get("candidates")),
                    _f(r.get("VmRSS"), 0),
                    _f(r.get("index_mb"), 0) if r.get("index_mb") is not None else DASH,
                    ("**met**" if _meets_search(r) else "missed") if at_target else "",
                ]
            )
        out += [
            "",
            f"### {dim if dim is not None else '?'}-dimensional embeddings",
            "",
            *_table(
                ["tiles", "method", "p50 ms", "p99 ms", "recall@10", "candidates", "VmRSS MB", "index MB", "target"],
                rows,
            ),
        ]
    if notes:
        out += ["", "Notes: " + "; ".join(f"`{m}`: {n}" for m, n in notes.items()) + "."]
    dim_plot = 704 if 704 in dims else dims[0]
    plot_rows = [r for r in results if r.get("dim") == dim_plot]
    if plot_rows:
        out += ["", rep.image(_plot_search(rep, plot_rows, methods, dim_plot), "search p50 latency vs map tiles")]

    # the target, per method, at 1M tiles and the plotted dimension
    at = [r for r in plot_rows if r.get("n_tiles") == SEARCH_TARGET_TILES]
    if not at:
        biggest = max((r.get("n_tiles") or 0 for r in plot_rows), default=0)
        rep.targets.append((target, f"no {SEARCH_TARGET_TILES:,}-tile run (largest {_g(biggest)})", "not measured"))
    else:
        met = [r for r in at if _meets_search(r)]
        free = [r for r in at if "prior" not in str(r.get("method"))]
        best_free = min(free, key=lambda r: _num(r.get("p50_ms")) or math.inf, default=None)

        def desc(r: dict) -> str:
            return f"`{r.get('method')}` {_ms(r.get('p50_ms'))} ms, R@10 {_f(r.get('recall@10'), 3)}"

        measured = "; ".join(desc(r) for r in met) if met else "no method"
        if met and all("prior" in str(r.get("method")) for r in met):
            measured += " (needs a position prior)"
        if best_free is not None and best_free not in met:
            measured += f"; fastest without a prior: {desc(best_free)}"
        status = "met" if met else "missed"
        if met and all("prior" in str(r.get("method")) for r in met):
            status = "met with a prior only"
        rep.targets.append((f"{target} (D={dim_plot})", measured, status))
    _exact_vs_faiss(rep, results, out)
    rep.sections.append(out)


def _exact_vs_faiss(rep: Report, results: list[dict], out: list[str]) -> None:
    """Target: the exact float16 scan at least as fast as ``faiss.IndexFlatIP`` (float32) at every size and D."""
    target = "exact search at least as fast as FAISS flat on the same data (10k-1M tiles, one query)"
    pairs = []
    for r in results:
        if r.get("method") != "exact":
            continue
        peer = next(
            (f for f in results if f.get("method") == "faiss-flat" and f.get("n_tiles") == r.get("n_tiles")
             and f.get("dim") == r.get("dim")),
            None,
        )  # fmt: skip
        if peer is not None and _num(r.get("p50_ms")) and _num(peer.get("p50_ms")):
            pairs.append((r["n_tiles"], r["dim"], r["p50_ms"], peer["p50_ms"]))
    if not pairs:
        rep.targets.append((target, "FAISS not installed in the run", "not measured"))
        return
    rows = [(n, dim, e, f, f / e) for n, dim, e, f in pairs]  # ratio > 1: the float16 scan is faster
    small = [r for r in rows if r[0] < SEARCH_MIN_TILES]
    rows = [r for r in rows if r[0] >= SEARCH_MIN_TILES] or rows
    n, dim, e, f, worst = min(rows, key=lambda r: r[4])
    biggest = max(r[0] for r in rows)
    measured = (
        "speed-up over FAISS flat "
        + ", ".join(f"{r[4]:.2f}x ({r[0]:,} x {r[1]})" for r in rows if r[0] == biggest)
        + f"; slowest case {n:,} x {dim}: {e:.3g} vs {f:.3g} ms ({worst:.2f}x)"
    )
    rep.targets.append((target, measured, "met" if worst >= 1.0 else "missed"))
    out += [
        "",
        "Exact scan against FAISS flat, p50 per query (interleaved, same queries): "
        + ", ".join(f"{r[0]:,} x {r[1]} {r[4]:.2f}x" for r in rows)
        + " (>1: the float16 scan is faster)."
        + (
            f" Below {SEARCH_MIN_TILES:,} tiles (not part of the target; the whole search takes microseconds and "
            "per-call overhead decides): " + ", ".join(f"{r[0]:,} x {r[1]} {r[4]:.2f}x" for r in small) + "."
            if small
            else ""
        ),
    ]


def _plot_search(rep: Report, rows: list[dict], methods: list[str], dim: Any) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    markers = "osD^v<>Px*"
    for i, m in enumerate(x for x in methods if any(str(r.get("method")) == x for r in rows)):
        rs = sorted(
            (r for r in rows if str(r.get("method")) == m and _num(r.get("p50_ms"))),
            key=lambda r: r.get("n_tiles") or 0,
        )
        if not rs:
            continue
        n = [r["n_tiles"] for r in rs]
        p50 = [r["p50_ms"] for r in rs]
        ax.plot(n, p50, marker=markers[i % len(markers)], label=m)
    ax.axhline(SEARCH_TARGET_MS, color="k", ls="--", lw=1, label=f"target {SEARCH_TARGET_MS:g} ms")
    ax.axvline(SEARCH_TARGET_TILES, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tiles in the map pack")
    ax.set_ylabel("p50 ms per query")
    ax.set_title(f"Search latency vs map size (D={dim})")
    ax.legend(fontsize=8)
    return _save(fig, rep.figure("perf_search_scaling.png"))


# -------------------------------------------------------------------------------------------------- export


def section_export(rep: Report, paths: Sequence[Path], command: str) -> None:
    title = "Export: INT8 vs FP32"
    target = f"INT8 R@1 within {INT8_TARGET_POINTS:g} point of FP32"
    rep.commands.append((title, command))
    found = next((p for p in paths if Path(p).is_file()), None)
    d, err = _load(found)
    arts = (d or {}).get("artefacts") or (d or {}).get("artifacts") or {}
    if d is None or not arts:
        rep.sections.append(_not_run(title, command, err))
        rep.targets.append((target, "not measured", "not measured"))
        return
    ckpt = (d.get("export") or {}).get("checkpoint")
    cmd = command
    if ckpt and d.get("scene"):
        cmd = (
            f"python benchmarks/bench_export.py --checkpoint {_rel(Path(ckpt))} --scene {d['scene']} "
            f"--calib-scenes <training scenes> --threads {d.get('threads', 1)} --out {_rel(Path(found).parent)}"
        )
    out = _header(title, cmd, _machine(d))
    out += [
        "",
        f"From `{_rel(found)}`; held-out scene `{d.get('scene', DASH)}`, {d.get('threads', DASH)} thread(s). "
        "`dense`: 64-px windows against tiles every 8 px with non-maximum suppression (what runs on board); "
        "`tiles`: against the non-overlapping tile gallery.",
    ]
    batches = sorted(
        {k for a in arts.values() for k in (a.get("latency_ms_per_window") or {})},
        key=lambda k: int("".join(c for c in k if c.isdigit()) or 0),
    )
    rows = []
    for name, a in arts.items():
        dense, tiles = a.get("dense") or {}, a.get("tiles") or {}
        lat = a.get("latency_ms_per_window") or {}
        rows.append(
            [
                name,
                _f(a.get("size_kb"), 0),
                _f(dense.get("recall@1"), 3),
                _f(dense.get("recall@10"), 3),
                _f(dense.get("median_error_m"), 0),
                _f(tiles.get("recall@1"), 3),
                *(_ms((lat.get(b) or {}).get("p50")) for b in batches),
            ]
        )
    out += [
        "",
        *_table(
            [
                "artefact",
                "size KB",
                "dense R@1",
                "dense R@10",
                "dense median m",
                "tiles R@1",
                *(f"p50 ms/window {b}" for b in batches),
            ],
            rows,
        ),
    ]
    fp32, int8 = arts.get("ort_fp32") or {}, arts.get("ort_int8") or {}
    parts, ok = [], []
    for gal in ("dense", "tiles"):
        a, b = _num((fp32.get(gal) or {}).get("recall@1")), _num((int8.get(gal) or {}).get("recall@1"))
        if a is None or b is None:
            continue
        diff = 100 * (b - a)
        parts.append(f"{gal}: FP32 {a:.3f}, INT8 {b:.3f} ({diff:+.1f} points)")
        ok.append(diff >= -INT8_TARGET_POINTS)
    if parts:
        rep.targets.append((target, "; ".join(parts), "met" if all(ok) else "missed"))
        out += ["", f"INT8 vs FP32 R@1: {'; '.join(parts)} (target: lose at most {INT8_TARGET_POINTS:g} point)."]
    else:
        rep.targets.append((target, "no FP32/INT8 pair in the JSON", "not measured"))
    rep.sections.append(out)


# ------------------------------------------------------------------------------------------------ accuracy


def _kind(d: dict, kind: str) -> dict:
    r = d.get("results", d) if isinstance(d.get("results"), dict) else d
    v = r.get(kind)
    return v if isinstance(v, dict) else {}


def _mean(xs: Iterable[Any]) -> float | None:
    v = [float(x) for x in xs if _num(x) is not None]
    return float(np.mean(v)) if v else None


def section_accuracy(rep: Report, refine: Path, loso: Path, cmd_refine: str, cmd_cfog: str) -> None:
    title = "Held-out accuracy: full path vs classical CFOG"
    rep.commands.append((title + " (refinement)", cmd_refine))
    rep.commands.append((title + " (CFOG baseline)", cmd_cfog))
    target = f"encoder + search + refine per window <= {CLASSICAL_TARGET_RATIO:.0%} of the classical per-query time"
    ref: dict[str, dict] = {}
    errs: list[str] = []
    for p in sorted(Path(refine).glob("*/refine_eval.json")) if Path(refine).is_dir() else []:
        d, e = _load(p)
        if d is not None:
            ref[str(d.get("scene") or p.parent.name)] = d
        elif e:
            errs.append(e)
    cfog: dict[str, dict] = {}
    cfog_host: dict = {}
    for p in sorted(Path(loso).glob("*/cfog/eval.json")) if Path(loso).is_dir() else []:
        d, e = _load(p)
        if d is not None:
            cfog[str(d.get("scene") or p.parent.parent.name)] = d
            cfog_host = cfog_host or d
        elif e:
            errs.append(e)
    if not ref and not cfog:
        rep.sections.append(_not_run(title, f"{cmd_cfog}; {cmd_refine}", "; ".join(errs) or None))
        rep.targets.append((target, "not measured", "not measured"))
        return
    out = [
        "",
        f"## {title}",
        "",
        "Commands:",
        "",
        *_code(f"{cmd_cfog}\n{cmd_refine}\n{cmd_refine} --table   # the full tables"),
    ]
    out += [
        "",
        f"Machine: refinement runs: {_machine(next(iter(ref.values()))) if ref else DASH}; "
        f"CFOG runs: {_machine(cfog_host) if cfog_host else DASH}.",
    ]
    out += [
        "",
        "Each scene held out in turn: encoder, shortlister, graph refiner and verifier trained without it. "
        "`ms/query` is per query after the one-off gallery embedding (encoder: SAR embedding + search + "
        "re-ranking, + registration for the verified rows; CFOG: FFT correlation over the whole map).",
    ]
    if errs:
        out += ["", "Skipped: " + "; ".join(errs)]
    if not ref:
        out += ["", f"Refinement not run: `{cmd_refine}`"]
    if not cfog:
        out += ["", f"CFOG baseline not run: `{cmd_cfog}`"]
    scenes = sorted(ref)
    common = [s for s in scenes if s in cfog]

    # per-scene table (arbitrary)
    rows, ratios = [], []
    for s in sorted(set(ref) | set(cfog)):
        a = _kind(ref.get(s, {}), "arbitrary")
        full = a.get(FULL_PATH) or a.get("gnn+metric") or {}
        coarse = a.get(COARSE) or {}
        c = _kind(cfog.get(s, {}), "arbitrary")
        fm, cm = _num(full.get("ms_per_query")), _num(c.get("ms_per_query"))
        ratio = fm / cm if fm is not None and cm else None
        if ratio is not None:
            ratios.append((s, ratio))
        rows.append(
            [
                s,
                _f(full.get("recall@1"), 3),
                _f(coarse.get("recall@1"), 3),
                _f(c.get("recall@1"), 3),
                _ms(full.get("ms_per_query")),
                _ms(c.get("ms_per_query")),
                DASH if ratio is None else f"{100 * ratio:.1f} %",
            ]
        )
    if common:
        mean_row = ["**mean of common scenes**"]
        for getter in (
            lambda s: _kind(ref[s], "arbitrary").get(FULL_PATH, {}).get("recall@1"),
            lambda s: _kind(ref[s], "arbitrary").get(COARSE, {}).get("recall@1"),
            lambda s: _kind(cfog[s], "arbitrary").get("recall@1"),
        ):
            mean_row.append(_f(_mean(getter(s) for s in common), 3))
        mean_row += [
            _ms(_mean(_kind(ref[s], "arbitrary").get(FULL_PATH, {}).get("ms_per_query") for s in common)),
            _ms(_mean(_kind(cfog[s], "arbitrary").get("ms_per_query") for s in common)),
            f"{100 * float(np.mean([r for _, r in ratios])):.1f} %" if ratios else DASH,
        ]
        rows.append(mean_row)
    out += [
        "",
        "### Per scene (arbitrary queries)",
        "",
        *_table(
            _cols("held-out scene|full path R@1|coarse R@1|CFOG R@1|full path ms/query|CFOG ms/query|full / CFOG time"),
            rows,
        ),
    ]

    if ratios:
        worst = max(r for _, r in ratios)
        rep.targets.append(
            (
                target + " (same map)",
                f"full path / CFOG time {100 * min(r for _, r in ratios):.1f}-{100 * worst:.1f} % over {len(ratios)} "
                f"scene(s), mean {100 * float(np.mean([r for _, r in ratios])):.1f} %",
                "met" if worst <= CLASSICAL_TARGET_RATIO else "missed",
            )
        )
    else:
        rep.targets.append((target, "needs refinement and CFOG runs of the same scene", "not measured"))
    if common:
        fr = _mean(_kind(ref[s], "arbitrary").get(FULL_PATH, {}).get("recall@1") for s in common)
        cr = _mean(_kind(cfog[s], "arbitrary").get("recall@1") for s in common)
        rep.headlines.append(
            (
                "held-out R@1, arbitrary queries (full path vs CFOG)",
                f"{_f(fr, 3)} vs {_f(cr, 3)} (mean of {len(common)} scene(s))",
                title,
            )
        )

    # mean over scenes per method, both kinds
    for kind in KINDS:
        methods = _methods(ref, kind)
        if not methods:
            continue
        rows = []
        for m in methods:
            ms = [_kind(ref[s], kind)[m] for s in scenes if m in _kind(ref[s], kind)]
            rows.append(_method_row(LABELS.get(m, m), ms))
        cs = [_kind(cfog[s], kind) for s in common if _kind(cfog[s], kind)]
        if cs:
            rows.append(_method_row(LABELS["cfog"] + (f" ({len(cs)} common scene(s))"), cs))
        out += [
            "",
            f"### Mean over {len(scenes)} scene(s), {kind} queries",
            "",
            *_table(
                _cols("method|R@1|R@5|R@10|median err m|p90 err m|<= 1 tile|ms/query|abstain|false fixes|ECE"),
                rows,
            ),
        ]

    # confidence per scene
    conf_rows = []
    for s in scenes:
        m = _kind(ref[s], "arbitrary").get(FULL_PATH) or {}
        if m.get("abstain_rate") is not None or m.get("ece") is not None:
            conf_rows.append(
                [
                    s,
                    _f(m.get("abstain_rate"), 2),
                    _f(m.get("false_fix_rate"), 3),
                    _f(m.get("ece"), 3),
                    _ms(m.get("trusted_median_error_m")),
                ]
            )
    if conf_rows:
        out += [
            "",
            "### Confidence of the full path (arbitrary queries)",
            "",
            *_table(
                ["held-out scene", "abstain", "false fixes among trusted", "ECE", "trusted median err m"], conf_rows
            ),
        ]

    # plots
    if ref or cfog:
        out += ["", rep.image(_plot_recall(rep, ref, cfog, scenes, common), "recall@k per method")]
    if any("errors_m" in _kind(ref[s], "arbitrary").get(m, {}) for s in scenes for m in (FULL_PATH, COARSE)):
        out += ["", rep.image(_plot_cdf(rep, ref, scenes), "error CDF, full path vs coarse")]
    bins = [b for s in scenes for b in (_kind(ref[s], "arbitrary").get(FULL_PATH) or {}).get("reliability") or []]
    if bins:
        out += ["", rep.image(_plot_reliability(rep, bins, len(scenes)), "reliability diagram of the full path")]
    rep.sections.append(out)


def _methods(ref: dict[str, dict], kind: str) -> list[str]:
    seen = {m for d in ref.values() for m in _kind(d, kind) if isinstance(_kind(d, kind).get(m), dict)}
    return [m for m in METHODS if m in seen] + sorted(m for m in seen if m not in METHODS and "@" not in m)


def _method_row(label: str, ms: list[dict]) -> list[str]:
    def mean(key: str) -> float | None:
        return _mean(m.get(key) for m in ms)

    return [
        label,
        _f(mean("recall@1"), 3),
        _f(mean("recall@5"), 3),
        _f(mean("recall@10"), 3),
        _f(mean("median_error_m"), 0),
        _f(mean("p90_error_m"), 0),
        _f(mean("within_tile"), 2),
        _ms(mean("ms_per_query")),
        _f(mean("abstain_rate"), 2),
        _f(mean("false_fix_rate"), 3),
        _f(mean("ece"), 3),
    ]


def _plot_recall(rep: Report, ref: dict, cfog: dict, scenes: list[str], common: list[str]) -> Path:
    plt = _plt()
    ks = (1, 5, 10)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    cmap = plt.get_cmap("tab20")
    handles: dict[str, Any] = {}
    for ax, kind in zip(axes, KINDS, strict=True):
        for i, m in enumerate(_methods(ref, kind)):
            ys = [_mean(_kind(ref[s], kind).get(m, {}).get(f"recall@{k}") for s in scenes) for k in ks]
            full = m == FULL_PATH
            (h,) = ax.plot(
                ks,
                [np.nan if y is None else y for y in ys],
                marker="o",
                ms=3,
                color=cmap(i % 20),
                lw=2.5 if full else 1,
                label=m + (" (full path)" if full else ""),
            )
            handles.setdefault(h.get_label(), h)
        cs = common or sorted(cfog)
        ys = [_mean(_kind(cfog[s], kind).get(f"recall@{k}") for s in cs if s in cfog) for k in ks]
        if any(y is not None for y in ys):
            (h,) = ax.plot(
                ks, [np.nan if y is None else y for y in ys], "k--", marker="s", ms=3, lw=1.5, label="classical CFOG"
            )
            handles.setdefault(h.get_label(), h)
        ax.set_xticks(ks)
        ax.set_xlabel("k")
        ax.set_title(f"{kind} queries")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"recall@k (mean of {len(scenes) or len(cfog)} scene(s))")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.77, 1))
    return _save(fig, rep.figure("perf_recall_at_k.png"), tight=False)


def _plot_cdf(rep: Report, ref: dict, scenes: list[str]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for m, style in ((FULL_PATH, {"color": "#C44E52", "lw": 2}), (COARSE, {"color": "#4C72B0", "lw": 1.2})):
        e = np.sort(
            [
                float(x)
                for s in scenes
                for x in (_kind(ref[s], "arbitrary").get(m) or {}).get("errors_m", [])
                if _num(x) is not None
            ]
        )
        if not len(e):
            continue
        ax.step(
            np.maximum(e, 0.1),
            np.arange(1, len(e) + 1) / len(e),
            where="post",
            label=f"{'full path' if m == FULL_PATH else 'coarse'} ({len(e)} queries)",
            **style,
        )
    ax.axvline(50, color="grey", ls=":", lw=1, label="50 m")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("position error, m (log)")
    ax.set_ylabel("fraction of queries")
    ax.set_title(f"Error CDF, arbitrary queries, pooled over {len(scenes)} scene(s)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, rep.figure("perf_error_cdf.png"))


def _plot_reliability(rep: Report, bins: list[dict], n_scenes: int) -> Path:
    plt = _plt()
    pooled: dict[str, list[float]] = {}
    for b in bins:
        n, p, o = _num(b.get("n")), _num(b.get("predicted")), _num(b.get("observed"))
        if not n or p is None or o is None:
            continue
        acc = pooled.setdefault(str(b.get("bin")), [0.0, 0.0, 0.0])
        acc[0] += n
        acc[1] += n * p
        acc[2] += n * o
    keys = sorted(pooled, key=lambda k: pooled[k][1] / pooled[k][0])
    n = np.array([pooled[k][0] for k in keys])
    pred = np.array([pooled[k][1] for k in keys]) / np.maximum(n, 1)
    obs = np.array([pooled[k][2] for k in keys]) / np.maximum(n, 1)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    if len(n):
        ax.plot(pred, obs, color="#C44E52", lw=1)
        ax.scatter(pred, obs, s=20 + 400 * n / n.max(), color="#C44E52", alpha=0.7, label="full path (size ~ n)")
        for x, y, c in zip(pred, obs, n, strict=True):
            ax.annotate(f"{int(c)}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("predicted P(fix within radius)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability, pooled over {n_scenes} scene(s)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, rep.figure("perf_reliability.png"))


# ------------------------------------------------------------------------------------------------- flights


def section_flights(rep: Report, flights: Path, command: str) -> None:
    title = "Simulated flights over held-out scenes"
    rep.commands.append((title, command))
    runs = []
    errs = []
    for p in sorted(Path(flights).glob("*/flight_*.json")) if Path(flights).is_dir() else []:
        d, e = _load(p)
        if d is not None:
            runs.append(d)
        elif e:
            errs.append(e)
    if not runs:
        rep.sections.append(_not_run(title, command, "; ".join(errs) or None))
        return
    cmds = []
    for d in runs:
        c = f"python benchmarks/flight_loso.py --scene {d.get('scene')} --track {d.get('track')}"
        c += f" --seed {d.get('seed', 0)}"
        if d.get("prior_radius_m") is not None:
            c += f" --prior-radius-m {d['prior_radius_m']}"
        cmds.append(c)
    out = ["", f"## {title}", "", "Commands:", "", *_code("\n".join(cmds))]
    out += ["", f"Machine: {_machine(runs[0])}."]
    out += [
        "",
        "The daemon replays a flight simulated over the held-out scene's SAR image against a map pack of its "
        "optical image, with models trained without that scene. Numbers only: the real scenes are research-only "
        "data, so no track plot of them is published here.",
    ]
    rows = []
    for d in runs:
        r = d.get("report") or {}
        rows.append(
            [
                str(d.get("scene", DASH)),
                str(d.get("track", DASH)),
                _g(d.get("seed")),
                _g(d.get("prior_radius_m")) if d.get("prior_radius_m") is not None else "none",
                f"{_g(r.get('n_trusted'))}/{_g(r.get('n_records'))}",
                _f(r.get("median_m"), 1),
                _f(r.get("p90_m"), 1),
                _f(r.get("max_m"), 1),
                DASH if _num(r.get("within_50_pct")) is None else f"{r['within_50_pct']:.0f} %",
                _f(r.get("false_fix_rate"), 3),
                _g(d.get("windows")),
                _pct(d.get("windows_within_50m")),
                _pct(d.get("trusted_windows_within_50m")),
            ]
        )
    out += [
        "",
        *_table(
            _cols(
                "scene|track|seed|prior m|trusted fixes|median m|p90 m|max m|fixes <= 50 m|false-fix rate|windows|"
                "windows <= 50 m|trusted windows <= 50 m"
            ),
            rows,
        ),
    ]
    stage_names = [s for s in (*STAGE_ORDER, "total") if any(s in (d.get("latency_ms") or {}) for d in runs)]
    stage_names += sorted({s for d in runs for s in (d.get("latency_ms") or {})} - set(stage_names))
    if stage_names:
        lat_rows = []
        for s in stage_names:
            cells = []
            for d in runs:
                q = (d.get("latency_ms") or {}).get(s) or {}
                cells.append(f"{_ms(q.get('50'))} / {_ms(q.get('95'))}" if q else DASH)
            lat_rows.append([f"**{s}**" if s == "total" else s, *cells])
        out += [
            "",
            "Per-window latency from the daemon's records, p50 / p95 ms:",
            "",
            *_table(["stage", *(f"{d.get('scene')} {d.get('track')}" for d in runs)], lat_rows),
        ]
    med = [float(d["report"]["median_m"]) for d in runs if _num((d.get("report") or {}).get("median_m")) is not None]
    if med:
        rep.headlines.append(
            (
                "flights over held-out real scenes: median fix error",
                f"{', '.join(f'{m:.1f}' for m in med)} m ({len(med)} flight(s))",
                title,
            )
        )
    rep.sections.append(out)


# ---------------------------------------------------------------------------------------------------- demo


def section_demo(rep: Report, path: Path, track: Path | None, command: str) -> None:
    title = "Flight demo over a generated scene"
    rep.commands.append((title, command))
    d, err = _load(path)
    if d is None:
        rep.sections.append(_not_run(title, command, err))
        return
    out = _header(title, command, _machine(d))
    dm, tm, mv = d.get("daemon") or {}, d.get("timings") or {}, d.get("mavlink") or {}
    rows = [
        ["fixes trusted / records", f"{_g(d.get('n_trusted'))} / {_g(d.get('n_records'))}"],
        [
            "median / p90 / max error m",
            f"{_f(d.get('median_m'), 1)} / {_f(d.get('p90_m'), 1)} / {_f(d.get('max_m'), 1)}",
        ],
        ["fixes within 50 m", DASH if _num(d.get("within_50_pct")) is None else f"{d['within_50_pct']:.0f} %"],
        ["false-fix rate", _f(d.get("false_fix_rate"), 3)],
    ]
    if dm:
        rows.append(
            ["strips / windows / errors", f"{_g(dm.get('strips'))} / {_g(dm.get('windows'))} / {_g(dm.get('errors'))}"]
        )
    if tm:
        rows.append(
            ["time s (" + " / ".join(k.removesuffix("_s") for k in tm) + ")", " / ".join(_f(v, 1) for v in tm.values())]
        )
    if mv:
        sent = {k.removeprefix("sent_"): v for k, v in mv.items() if k.startswith("sent_") and v}
        rows.append(["MAVLink sent", ", ".join(f"{k} {_g(v)}" for k, v in sent.items()) or DASH])
        dropped = sum(int(v) for k, v in mv.items() if (k.startswith("dropped") or k.endswith("errors")) and _num(v))
        rows.append(["MAVLink drops + errors", _g(dropped)])
    out += ["", *_table(["quantity", "value"], rows)]
    if track is not None and Path(track).is_file():
        dst = rep.figure("perf_demo_track.png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(track, dst)
        try:  # the demo plot is a full-resolution basemap: 60% is plenty for the docs (~190 KB instead of ~480)
            import cv2

            im = cv2.imread(str(dst))
            if im is not None:
                h, w = im.shape[:2]
                im = cv2.resize(im, (w * 6 // 10, h * 6 // 10), interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(dst), im, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        except ImportError:
            pass
        out += ["", rep.image(dst, "demo track over the generated scene")]
    if _num(d.get("median_m")) is not None:
        rep.headlines.append(
            (
                "flight demo (generated scene): median fix error",
                f"{_f(d.get('median_m'), 1)} m, {_g(d.get('n_trusted'))}/{_g(d.get('n_records'))} fixes trusted",
                title,
            )
        )
    rep.sections.append(out)


# ----------------------------------------------------------------------------------------------------- GPU


def _gpu_machine(d: dict) -> str:
    """The GPU, driver and software of gpu_check.json's ``meta`` (falls back to the generic reader)."""
    m = d.get("meta") or {}
    if not any(k in m for k in ("gpu", "device", "torch")):
        return _machine(d)
    parts = [str(m.get("gpu") or m.get("device"))]
    if m.get("capability"):
        parts.append(f"compute capability {m['capability']}")
    if _num(m.get("gpu_mem_gib")):
        parts.append(f"{m['gpu_mem_gib']:.0f} GiB")
    if m.get("nvidia_smi"):
        parts.append(f"nvidia-smi: {m['nvidia_smi']}")
    sw = [f"{k} {m[k]}" for k in ("torch", "torch_cuda", "cudnn", "python", "sarloc") if m.get(k) is not None]
    return ", ".join(parts) + ("; " + ", ".join(sw) if sw else "")


def section_gpu(rep: Report, paths: Sequence[Path], command: str) -> None:
    title = "GPU"
    rep.commands.append((title, command))
    found = next((p for p in paths if Path(p).is_file()), None)
    d, err = _load(found)
    if d is None:
        where = " or ".join(f"`{_rel(p)}`" for p in paths)
        msg = err or f"No GPU was lent to this task; `{command}` is the prepared script (it writes {where})."
        rep.sections.append(["", f"## {title}", "", msg])
        rep.headlines.append(("GPU", "no GPU was lent to this task", title))
        return
    meta, cfg = d.get("meta") or {}, d.get("config") or {}
    cmd = meta.get("command") or d.get("command") or command
    if cfg.get("checkpoint") not in (None, "None") and "--checkpoint" not in cmd:
        cmd += f" --checkpoint {cfg['checkpoint']}"
    out = _header(title, cmd, _gpu_machine(d))
    out += ["", f"From `{_rel(found)}`."]
    known = {
        "meta",
        "config",
        "errors",
        "encoder_info",
        "total_s",
        "section_s",
        "peaks",
        "encoder",
        "cuda_graph",
        "parity",
        "search",
    }
    peaks = d.get("peaks") or {}
    if peaks:
        vals = [f"{k} {_g(v)}" for k, v in peaks.items() if k.endswith(("tflops", "gbs"))]
        out += ["", "Peaks: " + ", ".join(vals) + "."]
    enc = d.get("encoder") or {}
    rows = []
    for label, group in (("", enc), (" + CUDA graph", d.get("cuda_graph") or {})):
        for mode, by_batch in group.items():
            if not isinstance(by_batch, dict):
                continue
            for b, r in by_batch.items():
                if isinstance(r, dict):
                    rows.append(
                        [
                            mode + label,
                            str(b),
                            _ms(r.get("p50_ms")),
                            _ms(r.get("p95_ms")),
                            _ms(r.get("ms_per_window")),
                            _g(round(r["windows_per_s"])) if _num(r.get("windows_per_s")) else DASH,
                        ]
                    )
    if rows:
        info = d.get("encoder_info") or {}
        fl = _num(info.get("flops_per_window"))
        out += [
            "",
            "### Encoder",
            "",
            f"Weights: {info.get('weights', DASH)}" + (f"; {fl / 1e6:.1f} MFLOP/window." if fl else "."),
            "",
            *_table(_cols("mode|batch|p50 ms/call|p95 ms/call|ms/window|windows/s"), rows),
        ]
    par = d.get("parity") or {}
    if par:
        prow = [
            [
                m,
                _g(p.get("windows")),
                _g(p.get("max_abs_diff")),
                _f(p.get("min_cosine"), 6),
                _f(p.get("min_cosine_learned"), 6),
                str(p.get("passed", DASH)),
            ]
            for m, p in par.items()
            if isinstance(p, dict)
        ]
        out += [
            "",
            "### Parity with CPU FP32",
            "",
            *_table(_cols("mode|windows|max abs diff|min cosine|min cosine (learned part)|passed"), prow),
        ]
    srch = d.get("search") or {}
    if srch:
        srows = []
        for b in srch.get("batch_sizes") or []:
            x = srch.get(f"batch_{b}") or {}
            srows.append(
                [
                    str(b),
                    _ms(x.get("p50_ms")),
                    _ms(x.get("p95_ms")),
                    _ms(x.get("ms_per_query")),
                    _g(round(x["queries_per_s"])) if _num(x.get("queries_per_s")) else DASH,
                    _f(x.get("read_gbs"), 0),
                ]
            )
        db = _num(srch.get("db_bytes"))
        out += [
            "",
            "### Brute-force search on the device",
            "",
            f"{_g(srch.get('n_tiles'))} x {_g(srch.get('dim'))} float16"
            + (f" ({db / 1e9:.2f} GB)" if db else "")
            + f", matmul + top-{_g(srch.get('k'))}.",
            "",
            *_table(_cols("batch|p50 ms/call|p95 ms/call|ms/query|queries/s|read GB/s"), srows),
        ]
        chk = srch.get("check") or {}
        if chk:
            out += [
                "",
                f"Top-10 against a CPU float32 reference on {_g(chk.get('queries'))} queries: overlap "
                f"{_f(chk.get('top10_overlap_mean'), 3)}, passed: {chk.get('passed', DASH)}.",
            ]
        n, q1 = srch.get("n_tiles"), _num((srch.get("batch_1") or {}).get("ms_per_query"))
        overlap = _num(chk.get("top10_overlap_mean"))
        if isinstance(n, int) and n >= SEARCH_TARGET_TILES and q1 is not None:
            ok = q1 <= SEARCH_TARGET_MS and (overlap is None or overlap >= SEARCH_TARGET_RECALL)
            rep.targets.append(
                (
                    f"{SEARCH_TARGET_TILES:,}-tile search <= {SEARCH_TARGET_MS:g} ms (GPU brute force, batch 1)",
                    f"{_ms(q1)} ms per query at {_g(n)} x {_g(srch.get('dim'))}, top-10 overlap {_f(overlap, 3)}",
                    "met" if ok else "missed",
                )
            )
    out += _gpu_training(Path(found).parent / "gpu_train")
    errors = d.get("errors") or {}
    if errors:
        out += ["", "Errors:", ""] + [
            f"* `{k}`: {str(v).strip().splitlines()[-1] if str(v).strip() else v}" for k, v in errors.items()
        ]
    rest = {k: v for k, v in d.items() if k not in known and k not in NOT_NUMBERS}
    for name, rl in _row_lists(rest):
        keys = list(dict.fromkeys(k for r in rl for k, v in r.items() if not isinstance(v, (dict, list))))
        out += ["", f"**{name}**", "", *_table(keys, [[_g(r.get(k)) for k in keys] for r in rl])]
    scalars = _flatten(rest)
    if scalars:
        out += ["", *_table(["quantity", "value"], [[f"`{k}`", _g(v)] for k, v in scalars])]
    rep.headlines.append(("GPU", f"checked on {_gpu_machine(d).split(';')[0]}", title))
    rep.sections.append(out)


def _gpu_training(folder: Path) -> list[str]:
    """Rows of ``benchmarks/gpu_train_check.sh`` (its $OUT/train_*/checkpoint.json), when it ran."""
    rows = []
    for run in ("single", "ddp"):
        d, _ = _load(folder / f"train_{run}" / "checkpoint.json")
        if not d:
            continue
        info, cfg = d.get("train_info") or d.get("info") or d, d.get("config") or {}
        steps, secs = _num(info.get("steps_done")), _num(info.get("train_seconds"))
        bs = _num(cfg.get("batch_size"))
        rows.append(
            [
                "python -m sarloc.cli train" if run == "single" else "torchrun (DDP, NCCL)",
                _g(info.get("world_size")),
                str(info.get("device", DASH)),
                _g(steps),
                _g(secs),
                _f(steps / secs, 1) if steps and secs else DASH,
                _g(round(steps * bs * _num(info.get("world_size") or 1) / secs)) if steps and secs and bs else DASH,
            ]
        )
    if not rows:
        return []
    return [
        "",
        "### Training on the device",
        "",
        "`bash benchmarks/gpu_train_check.sh SCENES 400` on generated scenes (preset `quick`, from scratch); the "
        "time includes pair sampling on the CPU.",
        "",
        *_table(_cols("run|processes|device|steps|seconds|steps/s|pairs/s"), rows),
    ]


# ------------------------------------------------------------------------------------------------ document


def _tally(targets: list[tuple[str, str, str]]) -> str:
    """One sentence counting the targets by status."""
    counts: dict[str, int] = {}
    for _, _, status in targets:
        counts[status] = counts.get(status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"Targets: {len(targets)} ({parts}). Each section below states its command and machine."


def render(rep: Report) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `benchmarks/perf_report.py` from the benchmark JSON; do not edit by hand. Nothing here shows "
        "the research-only scenes of `../shared/data`: their results appear as numbers only.",
        "",
        "## Summary (2-minute read)",
        "",
        _tally(rep.targets),
        "",
        *_table(["target", "measured", "status"], [[t, m, f"**{s}**" if s == "met" else s] for t, m, s in rep.targets]),
    ]
    if rep.headlines:
        lines += [
            "",
            "Headline numbers:",
            "",
            *_table(["what", "measured", "section"], [[w, m, s] for w, m, s in rep.headlines]),
        ]
    lines += [
        "",
        "Machines differ between sections (each states its own); compare ratios within a section rather "
        "than absolute times across sections.",
    ]
    for s in rep.sections:
        lines += s
    lines += ["", "## Reproduce", "", "Each command writes the JSON its section reads; then rebuild this page:", ""]
    lines += _code("\n".join(f"{c}   # {t}" for t, c in rep.commands) + "\npython benchmarks/perf_report.py")
    return "\n".join(lines) + "\n"


def build_report(a: argparse.Namespace) -> tuple[str, list[Path]]:
    """Markdown text and the figures written, from the parsed arguments."""
    out = Path(a.out)
    rep = Report(figures_dir=Path(a.figures), doc_dir=out.parent)
    runs = Path(a.runs)
    search, refine, loso, flights = Path(a.search), Path(a.refine), Path(a.loso), Path(a.flights)
    section_latency(
        rep, runs / "latency.json", f"python benchmarks/bench_latency.py --out {runs} --work {runs / 'work'}"
    )
    section_limits(
        rep,
        runs / "limits.json",
        f"python benchmarks/bench_limits.py --latency-json {runs / 'latency.json'} "
        f"--search-json {search} --out {runs / 'limits.json'}",
    )
    section_search(
        rep,
        search,
        f"python benchmarks/bench_search.py --sizes 1000 10000 100000 1000000 --dims 704 128 --out {search.parent}",
    )
    section_export(
        rep,
        [Path(p) for p in a.export],
        "python benchmarks/bench_export.py --checkpoint CKPT --scene SCENE --calib-scenes SCENES "
        f"--out {Path(a.export[0]).parent}",
    )
    section_accuracy(
        rep,
        refine,
        loso,
        f"python benchmarks/refine_loso.py --data ../shared/data --loso {loso} --out {refine}",
        f"python benchmarks/loso.py --data ../shared/data --out {loso} --variants cfog",
    )
    section_flights(rep, flights, f"python benchmarks/flight_loso.py --scene SCENE --track curve --out {flights}")
    section_demo(
        rep, Path(a.demo), Path(a.demo_track) if a.demo_track else None, f"sarloc demo --out {Path(a.demo).parent}"
    )
    gpu = [Path(a.gpu)] if a.gpu else [runs / "gpu_check.json", Path("runs/gpu/gpu_check.json")]
    if a.gpu_archive:  # last: the committed copy of a run on a GPU lent to an earlier task
        gpu.append(Path(a.gpu_archive))
    section_gpu(rep, gpu, "bash benchmarks/gpu_check.sh")
    return render(rep), rep.figures


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: write the markdown document and its figures; print what was written."""
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
    a = p.parse_args(argv)
    text, figures = build_report(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    for f in figures:
        print(f"wrote {f} ({f.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
