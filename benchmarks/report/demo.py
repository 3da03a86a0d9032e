"""Section "Flight demo over a generated scene" from ``sarloc demo``'s ``report.json`` and its track plot."""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import DASH, Report, fx, g, header, load, machine, not_run, num, table

TITLE = "Flight demo over a generated scene"


def section_demo(rep: Report, path: Path, track: Path | None, command: str) -> None:
    rep.commands.append((TITLE, command))
    d, err = load(path)
    if d is None:
        rep.sections.append(not_run(TITLE, command, err))
        return
    out = header(TITLE, command, machine(d))
    out += ["", *table(["quantity", "value"], _rows(d))]
    if track is not None and Path(track).is_file():
        out += [
            "",
            rep.image(
                _copy_track(Path(track), rep.figure("perf_demo_track.png")), "demo track over the generated scene"
            ),
        ]
    if num(d.get("median_m")) is not None:
        measured = f"{fx(d.get('median_m'), 1)} m, {g(d.get('n_trusted'))}/{g(d.get('n_records'))} fixes trusted"
        rep.headlines.append(("flight demo (generated scene): median fix error", measured, TITLE))
    rep.sections.append(out)


def _rows(d: dict) -> list[list[str]]:
    dm, tm, mv = d.get("daemon") or {}, d.get("timings") or {}, d.get("mavlink") or {}
    rows = [
        ["fixes trusted / records", f"{g(d.get('n_trusted'))} / {g(d.get('n_records'))}"],
        [
            "median / p90 / max error m",
            f"{fx(d.get('median_m'), 1)} / {fx(d.get('p90_m'), 1)} / {fx(d.get('max_m'), 1)}",
        ],
        ["fixes within 50 m", DASH if num(d.get("within_50_pct")) is None else f"{d['within_50_pct']:.0f} %"],
        ["false-fix rate", fx(d.get("false_fix_rate"), 3)],
    ]
    if dm:
        rows.append(
            ["strips / windows / errors", f"{g(dm.get('strips'))} / {g(dm.get('windows'))} / {g(dm.get('errors'))}"]
        )
    if tm:
        rows.append(
            ["time s (" + " / ".join(k.removesuffix("_s") for k in tm) + ")", " / ".join(fx(v, 1) for v in tm.values())]
        )
    if mv:
        sent = {k.removeprefix("sent_"): v for k, v in mv.items() if k.startswith("sent_") and v}
        rows.append(["MAVLink sent", ", ".join(f"{k} {g(v)}" for k, v in sent.items()) or DASH])
        dropped = sum(int(v) for k, v in mv.items() if (k.startswith("dropped") or k.endswith("errors")) and num(v))
        rows.append(["MAVLink drops + errors", g(dropped)])
    return rows


def _copy_track(track: Path, dst: Path) -> Path:
    """The demo's track plot at 60 % (a full-resolution basemap: ~190 KB instead of ~480); a copy without OpenCV."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(track, dst)
    try:
        import cv2

        im = cv2.imread(str(dst))
        if im is not None:
            h, w = im.shape[:2]
            im = cv2.resize(im, (w * 6 // 10, h * 6 // 10), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(dst), im, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    except ImportError:
        pass
    return dst
