"""Section "Measured vs physical floor" from ``benchmarks/bench_limits.py``'s ``limits.json`` (read generically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import DASH, NOT_NUMBERS, Report, flatten, g, header, load, machine, ms, not_run, num, row_lists, table

TITLE = "Measured vs physical floor"
LIMIT_COLUMNS = (
    ("what", "what"),
    ("measured_ms", "measured ms"),
    ("floor_1t_ms", "floor ms (1 thread)"),
    ("floor_all_ms", "floor ms (all threads)"),
    ("ratio_1t", "measured / floor (1 thread)"),
    ("ratio_all", "measured / floor (all)"),
    ("floor_kind", "bound by"),
)


def section_limits(rep: Report, path: Path, command: str) -> None:
    rep.commands.append((TITLE, command))
    d, err = load(path)
    if d is None:
        rep.sections.append(not_run(TITLE, command, err))
        return
    out = header(TITLE, command, machine(d))
    out += [
        "",
        "A floor is what no implementation on this machine can beat: FLOPs / measured GEMM peak (compute) or bytes "
        "read / measured memory bandwidth (a full-scan search). The ratio says how far above it the measured time is.",
    ]
    body = {k: v for k, v in d.items() if k not in NOT_NUMBERS}
    for name, rows in row_lists(body):
        keys = [k for k, _ in LIMIT_COLUMNS if any(k in r for r in rows)]
        if keys:
            labels = dict(LIMIT_COLUMNS)
            head = [labels[k] for k in keys]
            cells = [[_fmt_limit(k, r.get(k)) for k in keys] for r in rows]
        else:
            keys = sorted({k for r in rows for k, v in r.items() if num(v) is not None or isinstance(v, str)})
            head, cells = keys, [[g(r.get(k)) for k in keys] for r in rows]
        out += ["", f"**{name.removesuffix('.rows')}**", "", *table(head, cells)]
    scalars = flatten(body)
    if scalars:
        out += ["", "**quantities**", "", *table(["quantity", "value"], [[f"`{k}`", g(v)] for k, v in scalars])]
    rep.sections.append(out)


def _fmt_limit(key: str, v: Any) -> str:
    if key == "what" or key == "floor_kind":
        return DASH if v is None else str(v)
    if key.startswith("ratio"):
        return DASH if num(v) is None else f"{num(v):.2f}x"
    return ms(v)
