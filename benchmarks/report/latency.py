"""Section "Onboard pipeline latency (CPU)" from ``benchmarks/bench_latency.py``'s ``latency.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DASH, STAGE_ORDER, Report, cols, fx, g, header, load, machine, ms, not_run, num, plt, save, table

TITLE = "Onboard pipeline latency (CPU)"
REFINE_STAGES = ("preprocess", "encode", "search", "shortlist", "rerank", "register", "verify")
BACKEND_ORDER = ("ort_fp32", "ort_int8", "torch_eager")


def section_latency(rep: Report, path: Path, command: str) -> None:
    rep.commands.append((TITLE, command))
    d, err = load(path)
    if d is None:
        rep.sections.append(not_run(TITLE, command, err))
        return
    meta = d.get("meta") or {}
    cmd = meta.get("command") or command
    if cmd.split(" ", 1)[0].endswith(".py"):  # sys.argv joined: the script comes first
        cmd = f"python {cmd}"
    out = header(TITLE, cmd, machine(d))
    if meta.get("artifacts"):
        out += ["", "Artifacts (sha256): " + ", ".join(f"`{k}` {str(v)[:12]}" for k, v in meta["artifacts"].items())]
    out += _pipeline(rep, d.get("pipeline") or {})
    out += _encoder(d.get("encoder") or {})
    mem = d.get("memory") or {}
    if mem:
        out += [
            "",
            "Resident memory: "
            + ", ".join(f"{k.replace('rss_mb_', '')} {fx(v, 0)} MB" for k, v in mem.items() if num(v) is not None)
            + ".",
        ]
    out += _scaling(d.get("scaling") or [])
    rep.sections.append(out)


def _pipeline(rep: Report, pipe: dict) -> list[str]:
    """Per-stage percentiles, run facts, the refine sum, the plot and the headline."""
    stages = pipe.get("stages") or {}
    total = pipe.get("total") or {}
    if not (stages or total):
        return []
    names = [s for s in STAGE_ORDER if s in stages] + sorted(s for s in stages if s not in STAGE_ORDER)
    rows = [
        [s + (" (per strip)" if s == "fuse" else ""), *(ms(stages[s].get(q)) for q in ("p50", "p95", "p99"))]
        for s in names
    ]
    if total:
        rows.append(["**total per window**", *(f"**{ms(total.get(q))}**" for q in ("p50", "p95", "p99"))])
    out = ["", "### Per stage", "", *table(["stage", "p50 ms", "p95 ms", "p99 ms"], rows)]
    facts = []
    for key, unit in (("windows", "windows"), ("strips", "strips"), ("tiles", "map tiles")):
        if pipe.get(key) is not None:
            facts.append(f"{g(pipe[key])} {unit}")
    if pipe.get("windows_per_s") is not None:
        facts.append(f"{fx(pipe['windows_per_s'], 1)} windows/s end to end (one process)")
    if facts:
        out += ["", ", ".join(facts) + "."]
    ref = [s for s in REFINE_STAGES if s in stages and num(stages[s].get("p50")) is not None]
    if ref:
        ssum = sum(float(stages[s]["p50"]) for s in ref)
        out += [
            "",
            f"Encoder + search + refine ({' + '.join(ref)}) sum of p50: **{ms(ssum)} ms per window** "
            "(on the generated map of this run; the target compares with the classical baseline on the same map, "
            "see the accuracy section).",
        ]
    if names:
        out += ["", rep.image(_plot_stages(rep, names, stages), "per-stage p50 latency with p95 whiskers")]
    if num(total.get("p50")) is not None:
        tput = f", {fx(pipe.get('windows_per_s'), 1)} windows/s" if num(pipe.get("windows_per_s")) else ""
        measured = f"p50 {ms(total['p50'])} ms, p99 {ms(total.get('p99'))} ms{tput}"
        rep.headlines.append(("pipeline latency per window (CPU)", measured, TITLE))
    return out


def _encoder(enc: dict) -> list[str]:
    """ms per window per backend and batch, and the ratios to ONNX Runtime FP32."""
    if not enc:
        return []
    backends = [b for b in BACKEND_ORDER if b in enc] + sorted(b for b in enc if b not in BACKEND_ORDER)
    batches = sorted({int(k) for b in backends for k in (enc[b] or {}) if str(k).isdigit()})
    rows = []
    for b in backends:
        cells = []
        for n in batches:
            r = (enc[b] or {}).get(str(n)) or {}
            wps = num(r.get("windows_per_s"))
            cells.append(f"{ms(r.get('p50'))} ({g(round(wps)) if wps else DASH}/s)" if r else DASH)
        rows.append([b, *cells])
    out = [
        "",
        "### Encoder backends",
        "",
        "ms per window, p50 (windows/s in brackets), same prepared windows for every backend:",
        "",
        *table(["backend", *(f"batch {n}" for n in batches)], rows),
    ]
    if "ort_fp32" not in enc:
        return out
    ratios = []
    for b, label in (("ort_int8", "INT8 / FP32"), ("torch_eager", "PyTorch eager / ORT FP32")):
        if b not in enc:
            continue
        cells = []
        for n in batches:
            x = num(((enc[b] or {}).get(str(n)) or {}).get("p50"))
            y = num(((enc["ort_fp32"] or {}).get(str(n)) or {}).get("p50"))
            cells.append(f"{x / y:.2f}x" if x is not None and y else DASH)
        ratios.append([label, *cells])
    if ratios:
        out += [
            "",
            "Ratios of p50 ms per window (below 1: faster than ONNX Runtime FP32):",
            "",
            *table(["ratio", *(f"batch {n}" for n in batches)], ratios),
        ]
    return out


def _scaling(scaling: list[dict]) -> list[str]:
    if not scaling:
        return []
    rows = [
        [
            g(s.get("map_px")) if s.get("map_px") is not None else DASH,
            g(s.get("n_tiles")),
            g(s.get("prior_radius_m")) if s.get("prior_radius_m") is not None else "none",
            ms(s.get("search_ms_p50")),
            ms(s.get("search_ms_p99")),
            ms(s.get("end_to_end_ms_p50")),
            ms(s.get("end_to_end_ms_p99")),
        ]
        for s in scaling
    ]
    spec = "map px|tiles|prior radius m|search p50 ms|search p99 ms|end-to-end p50 ms|end-to-end p99 ms"
    return ["", "### Scaling with the map", "", *table(cols(spec), rows)]


def _plot_stages(rep: Report, names: list[str], stages: dict) -> Path:
    pyplot = plt()
    p50 = np.array([num(stages[s].get("p50")) or 0.0 for s in names])
    p95 = np.array([num(stages[s].get("p95")) or v for s, v in zip(names, p50, strict=True)])
    fig, ax = pyplot.subplots(figsize=(6.4, 0.35 * len(names) + 1.2))
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
        ax.text(max(v, w), yi, f"  {ms(v)} / {ms(w)}", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, [s + (" /strip" if s == "fuse" else "") for s in names])
    ax.set_xlabel("ms per window (bar and first label: p50; whisker and second label: p95)")
    ax.set_title("Pipeline latency per stage")
    ax.set_xlim(0, max(float(p95.max()), 1e-3) * 1.35)
    return save(fig, rep.figure("perf_latency_stages.png"))
