"""Section "Export: INT8 vs FP32" from ``benchmarks/bench_export.py``'s ``results.json``, with its target."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .common import DASH, Report, fx, header, load, machine, ms, not_run, num, rel, table

TITLE = "Export: INT8 vs FP32"
INT8_TARGET_POINTS = 1.0  # INT8 R@1 may lose at most this many points against FP32
TARGET = f"INT8 R@1 within {INT8_TARGET_POINTS:g} point of FP32"


def section_export(rep: Report, paths: Sequence[Path], command: str) -> None:
    rep.commands.append((TITLE, command))
    found = next((p for p in paths if Path(p).is_file()), None)
    d, err = load(found)
    arts = (d or {}).get("artefacts") or (d or {}).get("artifacts") or {}
    if d is None or not arts:
        rep.sections.append(not_run(TITLE, command, err))
        rep.targets.append((TARGET, "not measured", "not measured"))
        return
    ckpt = (d.get("export") or {}).get("checkpoint")
    cmd = command
    if ckpt and d.get("scene"):
        cmd = (
            f"python benchmarks/bench_export.py --checkpoint {rel(Path(ckpt))} --scene {d['scene']} "
            f"--calib-scenes <training scenes> --threads {d.get('threads', 1)} --out {rel(Path(found).parent)}"
        )
    out = header(TITLE, cmd, machine(d))
    out += [
        "",
        f"From `{rel(found)}`; held-out scene `{d.get('scene', DASH)}`, {d.get('threads', DASH)} thread(s). "
        "`dense`: 64-px windows against tiles every 8 px with non-maximum suppression (what runs on board); "
        "`tiles`: against the non-overlapping tile gallery.",
    ]
    out += _artefact_table(arts)
    out += _int8_target(rep, arts)
    rep.sections.append(out)


def _artefact_table(arts: dict) -> list[str]:
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
                fx(a.get("size_kb"), 0),
                fx(dense.get("recall@1"), 3),
                fx(dense.get("recall@10"), 3),
                fx(dense.get("median_error_m"), 0),
                fx(tiles.get("recall@1"), 3),
                *(ms((lat.get(b) or {}).get("p50")) for b in batches),
            ]
        )
    head = ["artefact", "size KB", "dense R@1", "dense R@10", "dense median m", "tiles R@1"]
    return ["", *table([*head, *(f"p50 ms/window {b}" for b in batches)], rows)]


def _int8_target(rep: Report, arts: dict) -> list[str]:
    """R@1 of INT8 against FP32 per gallery: the target row and the section's sentence."""
    fp32, int8 = arts.get("ort_fp32") or {}, arts.get("ort_int8") or {}
    parts, ok = [], []
    for gal in ("dense", "tiles"):
        a, b = num((fp32.get(gal) or {}).get("recall@1")), num((int8.get(gal) or {}).get("recall@1"))
        if a is None or b is None:
            continue
        diff = 100 * (b - a)
        parts.append(f"{gal}: FP32 {a:.3f}, INT8 {b:.3f} ({diff:+.1f} points)")
        ok.append(diff >= -INT8_TARGET_POINTS)
    if not parts:
        rep.targets.append((TARGET, "no FP32/INT8 pair in the JSON", "not measured"))
        return []
    rep.targets.append((TARGET, "; ".join(parts), "met" if all(ok) else "missed"))
    return ["", f"INT8 vs FP32 R@1: {'; '.join(parts)} (target: lose at most {INT8_TARGET_POINTS:g} point)."]
