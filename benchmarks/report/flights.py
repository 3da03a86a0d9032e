"""Section "Simulated flights over held-out scenes" from ``benchmarks/flight_loso.py``'s ``<scene>/flight_*.json``.

Numbers only: the real scenes are research-only data and no image of them is published.
"""

from __future__ import annotations

from pathlib import Path

from .common import DASH, STAGE_ORDER, Report, code, cols, fx, g, load_all, machine, ms, not_run, num, pct, table

TITLE = "Simulated flights over held-out scenes"
FLIGHT_COLUMNS = (
    "scene|track|seed|prior m|trusted fixes|median m|p90 m|max m|fixes <= 50 m|false-fix rate|windows|"
    "windows <= 50 m|trusted windows <= 50 m"
)


def section_flights(rep: Report, flights: Path, command: str) -> None:
    rep.commands.append((TITLE, command))
    paths = sorted(Path(flights).glob("*/flight_*.json")) if Path(flights).is_dir() else []
    found, errs = load_all(paths)
    runs = [d for _, d in found]
    if not runs:
        rep.sections.append(not_run(TITLE, command, "; ".join(errs) or None))
        return
    out = ["", f"## {TITLE}", "", "Commands:", "", *code("\n".join(_command(d) for d in runs))]
    out += [
        "",
        f"Machine: {machine(runs[0])}.",
        "",
        "The daemon replays a flight simulated over the held-out scene's SAR image against a map pack of its "
        "optical image, with models trained without that scene. Numbers only: the real scenes are research-only "
        "data, so no track plot of them is published here.",
    ]
    out += ["", *table(cols(FLIGHT_COLUMNS), [_flight_row(d) for d in runs])]
    out += _latency(runs)
    med = [float(d["report"]["median_m"]) for d in runs if num((d.get("report") or {}).get("median_m")) is not None]
    if med:
        measured = f"{', '.join(f'{m:.1f}' for m in med)} m ({len(med)} flight(s))"
        rep.headlines.append(("flights over held-out real scenes: median fix error", measured, TITLE))
    rep.sections.append(out)


def _command(d: dict) -> str:
    c = f"python benchmarks/flight_loso.py --scene {d.get('scene')} --track {d.get('track')}"
    c += f" --seed {d.get('seed', 0)}"
    if d.get("prior_radius_m") is not None:
        c += f" --prior-radius-m {d['prior_radius_m']}"
    return c


def _flight_row(d: dict) -> list[str]:
    r = d.get("report") or {}
    return [
        str(d.get("scene", DASH)),
        str(d.get("track", DASH)),
        g(d.get("seed")),
        g(d.get("prior_radius_m")) if d.get("prior_radius_m") is not None else "none",
        f"{g(r.get('n_trusted'))}/{g(r.get('n_records'))}",
        fx(r.get("median_m"), 1),
        fx(r.get("p90_m"), 1),
        fx(r.get("max_m"), 1),
        DASH if num(r.get("within_50_pct")) is None else f"{r['within_50_pct']:.0f} %",
        fx(r.get("false_fix_rate"), 3),
        g(d.get("windows")),
        pct(d.get("windows_within_50m")),
        pct(d.get("trusted_windows_within_50m")),
    ]


def _latency(runs: list[dict]) -> list[str]:
    """Per-stage p50 / p95 of the daemon's records, one column per flight."""
    stage_names = [s for s in (*STAGE_ORDER, "total") if any(s in (d.get("latency_ms") or {}) for d in runs)]
    stage_names += sorted({s for d in runs for s in (d.get("latency_ms") or {})} - set(stage_names))
    if not stage_names:
        return []
    rows = []
    for s in stage_names:
        cells = []
        for d in runs:
            q = (d.get("latency_ms") or {}).get(s) or {}
            cells.append(f"{ms(q.get('50'))} / {ms(q.get('95'))}" if q else DASH)
        rows.append([f"**{s}**" if s == "total" else s, *cells])
    return [
        "",
        "Per-window latency from the daemon's records, p50 / p95 ms:",
        "",
        *table(["stage", *(f"{d.get('scene')} {d.get('track')}" for d in runs)], rows),
    ]
