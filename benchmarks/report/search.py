"""Section "Map search scaling" from ``benchmarks/bench_search.py``'s ``results.json``, with its two targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import (
    DASH,
    SEARCH_TARGET_MS,
    SEARCH_TARGET_RECALL,
    SEARCH_TARGET_TILES,
    Report,
    fx,
    g,
    header,
    load,
    machine,
    ms,
    not_run,
    num,
    plt,
    save,
    table,
)

TITLE = "Map search scaling"
SEARCH_MIN_TILES = 10_000  # the exact-vs-FAISS target covers the scale sizes (10k, 100k, 1M)
TARGET = f"{SEARCH_TARGET_TILES:,}-tile search <= {SEARCH_TARGET_MS:g} ms at recall@10 >= {SEARCH_TARGET_RECALL}"
FAISS_TARGET = "exact search at least as fast as FAISS flat on the same data (10k-1M tiles, one query)"
SEARCH_COLUMNS = ["tiles", "method", "p50 ms", "p99 ms", "recall@10", "candidates", "VmRSS MB", "index MB", "target"]


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
    p50, rec = num(r.get("p50_ms")), num(r.get("recall@10"))
    return p50 is not None and rec is not None and p50 <= SEARCH_TARGET_MS and rec >= SEARCH_TARGET_RECALL


def section_search(rep: Report, path: Path, command: str) -> None:
    rep.commands.append((TITLE, command))
    d, err = load(path)
    results = [r for r in (d or {}).get("results", []) if isinstance(r, dict)]
    if d is None or not results:
        rep.sections.append(not_run(TITLE, command, err))
        rep.targets.append((TARGET, "not measured", "not measured"))
        return
    out = header(TITLE, _search_command(d, command), machine(d))
    cfg = d.get("config") or {}
    if cfg:
        out += [
            "",
            f"{g(cfg.get('queries'))} queries per pack (half at 1M tiles), query noise {g(cfg.get('query_noise'))}, "
            f"prior radius {g(cfg.get('prior_radius_m'))} m, {g(cfg.get('threads'))} thread(s), "
            f"scorer `{cfg.get('scorer', DASH)}` (kernel `{results[0].get('kernel', DASH)}`). Recall@10 is against "
            "the exact search (see the notes).",
        ]
    dims = sorted({r.get("dim") for r in results if r.get("dim") is not None}, reverse=True) or [None]
    methods = list(dict.fromkeys(str(r.get("method")) for r in results))
    notes: dict[str, str] = {}
    for dim in dims:
        out += _dim_table(results, dim, methods, notes)
    if notes:
        out += ["", "Notes: " + "; ".join(f"`{m}`: {n}" for m, n in notes.items()) + "."]
    dim_plot = 704 if 704 in dims else dims[0]
    plot_rows = [r for r in results if r.get("dim") == dim_plot]
    if plot_rows:
        out += ["", rep.image(_plot_search(rep, plot_rows, methods, dim_plot), "search p50 latency vs map tiles")]
    _search_target(rep, plot_rows, dim_plot)
    _exact_vs_faiss(rep, results, out)
    rep.sections.append(out)


def _dim_table(results: list[dict], dim: Any, methods: list[str], notes: dict[str, str]) -> list[str]:
    """The table of one embedding dimension; the methods' notes are collected into ``notes``."""
    rows = []
    for r in sorted(
        (r for r in results if r.get("dim") == dim),
        key=lambda r: (r.get("n_tiles") or 0, methods.index(str(r.get("method")))),
    ):
        m = str(r.get("method"))
        if r.get("note"):
            notes.setdefault(m, str(r["note"]))
        at_target = r.get("n_tiles") == SEARCH_TARGET_TILES
        extra = [f"{k}={g(r[k])}" for k in ("nlist", "nprobe", "prior_radius_m") if r.get(k) is not None]
        rows.append(
            [
                g(r.get("n_tiles")),
                m + (f" ({', '.join(extra)})" if extra else ""),
                ms(r.get("p50_ms")),
                ms(r.get("p99_ms")),
                fx(r.get("recall@10"), 3),
                g(r.get("candidates")),
                fx(r.get("VmRSS"), 0),
                fx(r.get("index_mb"), 0) if r.get("index_mb") is not None else DASH,
                ("**met**" if _meets_search(r) else "missed") if at_target else "",
            ]
        )
    title = f"### {dim if dim is not None else '?'}-dimensional embeddings"
    return ["", title, "", *table(SEARCH_COLUMNS, rows)]


def _search_target(rep: Report, plot_rows: list[dict], dim_plot: Any) -> None:
    """The target, per method, at 1M tiles and the plotted dimension."""
    at = [r for r in plot_rows if r.get("n_tiles") == SEARCH_TARGET_TILES]
    if not at:
        biggest = max((r.get("n_tiles") or 0 for r in plot_rows), default=0)
        rep.targets.append((TARGET, f"no {SEARCH_TARGET_TILES:,}-tile run (largest {g(biggest)})", "not measured"))
        return
    met = [r for r in at if _meets_search(r)]
    free = [r for r in at if "prior" not in str(r.get("method"))]
    best_free = min(free, key=lambda r: num(r.get("p50_ms")) or math.inf, default=None)

    def desc(r: dict) -> str:
        return f"`{r.get('method')}` {ms(r.get('p50_ms'))} ms, R@10 {fx(r.get('recall@10'), 3)}"

    measured = "; ".join(desc(r) for r in met) if met else "no method"
    if met and all("prior" in str(r.get("method")) for r in met):
        measured += " (needs a position prior)"
    if best_free is not None and best_free not in met:
        measured += f"; fastest without a prior: {desc(best_free)}"
    status = "met" if met else "missed"
    if met and all("prior" in str(r.get("method")) for r in met):
        status = "met with a prior only"
    rep.targets.append((f"{TARGET} (D={dim_plot})", measured, status))


def _exact_vs_faiss(rep: Report, results: list[dict], out: list[str]) -> None:
    """Target: the exact float16 scan at least as fast as ``faiss.IndexFlatIP`` (float32) at every size and D."""
    pairs = []
    for r in results:
        if r.get("method") != "exact":
            continue
        peer = next(
            (f for f in results if f.get("method") == "faiss-flat" and f.get("n_tiles") == r.get("n_tiles")
             and f.get("dim") == r.get("dim")),
            None,
        )  # fmt: skip
        if peer is not None and num(r.get("p50_ms")) and num(peer.get("p50_ms")):
            pairs.append((r["n_tiles"], r["dim"], r["p50_ms"], peer["p50_ms"]))
    if not pairs:
        rep.targets.append((FAISS_TARGET, "FAISS not installed in the run", "not measured"))
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
    rep.targets.append((FAISS_TARGET, measured, "met" if worst >= 1.0 else "missed"))
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
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.4, 4.0))
    markers = "osD^v<>Px*"
    for i, m in enumerate(x for x in methods if any(str(r.get("method")) == x for r in rows)):
        rs = sorted(
            (r for r in rows if str(r.get("method")) == m and num(r.get("p50_ms"))),
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
    return save(fig, rep.figure("perf_search_scaling.png"))
