"""What every section shares: number formatting, Markdown tables, the JSON reader, the plot helpers, the Report."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASH = "–"
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
SEARCH_TARGET_TILES = 1_000_000
SEARCH_TARGET_MS = 10.0
SEARCH_TARGET_RECALL = 0.99
NOT_NUMBERS = ("hardware", "versions", "config", "sources", "meta", "total_s")


# ---------------------------------------------------------------------------------------------- formatting


def num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, null, NaN, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def ms(x: Any) -> str:
    """Milliseconds with a precision that suits their size."""
    v = num(x)
    if v is None:
        return DASH
    a = abs(v)
    return f"{v:.3f}" if a < 1 else f"{v:.2f}" if a < 10 else f"{v:.1f}" if a < 100 else f"{v:.0f}"


def fx(x: Any, nd: int = 2) -> str:
    """A fixed-point number with ``nd`` decimals."""
    v = num(x)
    return DASH if v is None else f"{v:.{nd}f}"


def g(x: Any) -> str:
    """A generic number: integers as integers, others with 4 significant digits."""
    v = num(x)
    if v is None:
        return DASH if x is None else str(x)
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def pct(x: Any, nd: int = 1) -> str:
    v = num(x)
    return DASH if v is None else f"{100 * v:.{nd}f} %"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    rows = [[str(c) for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def cols(spec: str) -> list[str]:
    """Table header cells from ``"a|b|c"``."""
    return spec.split("|")


def code(cmd: str) -> list[str]:
    return ["```bash", cmd, "```"]


def machine(d: dict) -> str:
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


def load(path: Path | None) -> tuple[dict | None, str | None]:
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


def load_all(paths: Iterable[Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The readable JSON objects among ``paths`` and a message for each unreadable one."""
    found, errs = [], []
    for p in paths:
        d, e = load(p)
        if d is not None:
            found.append((p, d))
        elif e:
            errs.append(e)
    return found, errs


def rel(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (commands stay copy-pasteable)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Numeric leaves of nested dicts as (dotted name, value); lists of row dicts are skipped (shown as tables)."""
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if k in NOT_NUMBERS:
                continue
            if isinstance(v, dict):
                out += flatten(v, name)
            elif num(v) is not None:
                out.append((name, v))
    return out


def row_lists(d: Any, prefix: str = "") -> list[tuple[str, list[dict]]]:
    """Lists of dicts found anywhere in ``d`` (e.g. ``encoder.rows``, ``search.rows``)."""
    out: list[tuple[str, list[dict]]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                out.append((name, v))
            elif isinstance(v, dict):
                out += row_lists(v, name)
    return out


# ----------------------------------------------------------------------------------------------------- plots


def plt():
    """matplotlib.pyplot on the Agg backend with the report's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": 100})
    return pyplot


def save(fig: Any, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version string: same inputs, same bytes
    import matplotlib.pyplot as pyplot

    pyplot.close(fig)
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
        rel_path = os.path.relpath(Path(path).resolve(), Path(self.doc_dir).resolve())
        return f"![{alt}]({Path(rel_path).as_posix()})"


def header(title: str, command: str, machine_line: str | None) -> list[str]:
    lines = ["", f"## {title}", "", "Command:", "", *code(command)]
    if machine_line is not None:
        lines += ["", f"Machine: {machine_line}."]
    return lines


def not_run(title: str, command: str, why: str | None = None) -> list[str]:
    """The section of an input that is missing (``not run: <command>``) or unreadable (``why``)."""
    return ["", f"## {title}", "", why or f"not run: `{command}`"] + (
        ["", f"To produce it: `{command}`"] if why else []
    )
