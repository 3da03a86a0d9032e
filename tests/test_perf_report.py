"""benchmarks/perf_report.py + benchmarks/report/: the performance page as a renderer of benchmark JSON.

The tests write a small JSON set that follows the producers' schemas (the GPU part is the committed run in
``docs/data/gpu_h200``), render the page, parse its Markdown tables back and check that the numbers shown are the
numbers in the JSON, that every section is there, that a missing or unreadable input gives a "not run" /
"not measured" line instead of a crash, and that the plots are written (same inputs, same bytes).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "perf_report.py"
GPU_JSON = ROOT / "docs" / "data" / "gpu_h200" / "gpu_check.json"
SCENES = ("scene_a", "scene_b")
FULL = "shortlist+gnn+metric"
TITLES = [
    "Summary (2-minute read)",
    "Onboard pipeline latency (CPU)",
    "Measured vs physical floor",
    "Map search scaling",
    "Export: INT8 vs FP32",
    "Held-out accuracy: full path vs classical CFOG",
    "Simulated flights over held-out scenes",
    "Flight demo over a generated scene",
    "GPU",
    "Reproduce",
]
PLOTS = {
    "perf_latency_stages.png",
    "perf_search_scaling.png",
    "perf_recall_at_k.png",
    "perf_error_cdf.png",
    "perf_reliability.png",
    "perf_demo_track.png",
}


@pytest.fixture(scope="module")
def perf_report():
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("_bench_perf_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(mod)  # puts benchmarks/ on sys.path for its renderer package `report`
        yield mod
    finally:
        sys.path[:] = path
        for name in [m for m in sys.modules if m == "report" or m.startswith("report.")]:
            sys.modules.pop(name)


# ------------------------------------------------------------------------------------------ the JSON set


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _pct(p50: float) -> dict:
    return {"p50": p50, "p95": 1.5 * p50, "p99": 2 * p50}


def _metrics(r1: float, ms: float, metric: bool = False) -> dict:
    m = {
        "recall@1": r1,
        "recall@5": min(1.0, r1 + 0.1),
        "recall@10": min(1.0, r1 + 0.2),
        "median_error_m": 100.0 * (1 - r1),
        "p90_error_m": 3000.0,
        "within_tile": r1 + 0.05,
        "ms_per_query": ms,
        "errors_m": [3.0, 12.0, 80.0, 4000.0],
    }
    if metric:
        bins = [{"bin": "0.0-0.2", "n": 10, "predicted": 0.1, "observed": 0.15}]
        bins.append({"bin": "0.8-1.0", "n": 30, "predicted": 0.9, "observed": 0.93})
        m |= {"abstain_rate": 0.3, "false_fix_rate": 0.05, "ece": 0.08, "trusted_median_error_m": 9.0}
        m["reliability"] = bins
    return m


def json_set() -> dict[str, object]:
    """Every input of the page but the GPU one, keyed by its path below the input folder."""
    hw = {"machine": "x86_64", "cpu": "Test CPU", "cpus": 2}
    stages = {s: _pct(0.5 + i) for i, s in enumerate(("window", "preprocess", "encode", "search", "register", "fuse"))}
    enc = {
        "ort_fp32": {"1": {**_pct(1.0), "windows_per_s": 1000.0}, "8": {**_pct(0.5), "windows_per_s": 2000.0}},
        "ort_int8": {"1": {**_pct(0.8), "windows_per_s": 1250.0}, "8": {**_pct(0.4), "windows_per_s": 2500.0}},
        "torch_eager": {"1": {**_pct(4.0), "windows_per_s": 250.0}},
    }
    scaling = [
        {"n_tiles": 1000, "search_ms_p50": 0.2, "search_ms_p99": 0.4, "end_to_end_ms_p50": 10.0},
        {"n_tiles": 9000, "search_ms_p50": 0.9, "search_ms_p99": 1.4, "end_to_end_ms_p50": 11.0, "prior_radius_m": 2e3},
    ]
    runs = [(10_000, "exact", 3.0, 1.0), (1_000_000, "exact", 200.0, 1.0), (10_000, "faiss-flat", 4.0, 1.0)]
    runs += [(1_000_000, "faiss-flat", 150.0, 1.0), (10_000, "ivf", 0.3, 0.995), (1_000_000, "ivf", 8.0, 0.99)]
    runs += [(1_000_000, "prior", 1.5, 1.0)]
    results = [
        {"n_tiles": n, "dim": 704, "method": m, "p50_ms": t, "p99_ms": 2 * t, "recall@10": r, "candidates": n}
        for n, m, t, r in runs
    ]
    arts = {
        name: {
            "size_kb": kb,
            "dense": {"recall@1": r1, "recall@10": 0.86, "median_error_m": 400.0},
            "tiles": {"recall@1": 0.1},
            "latency_ms_per_window": {"batch1": _pct(t)},
        }
        for name, kb, r1, t in (("ort_fp32", 3000.0, 0.475, 0.9), ("ort_int8", 1000.0, 0.47, 1.0))
    }
    limits = {"hardware": hw, "peak_gflops": 100.0, "encoder": {"flops": 44.8e6, "rows": [_limit_row()]}}
    out: dict[str, object] = {
        "bench/latency.json": {
            "meta": {"hardware": hw, "command": "benchmarks/bench_latency.py"},
            "encoder": enc,
            "pipeline": {"stages": stages, "total": _pct(12.0), "windows": 40, "windows_per_s": 80.0, "strips": 4},
            "memory": {"rss_mb_start": 100.0, "rss_mb_peak": 180.0},
            "scaling": scaling,
        },
        "bench/limits.json": limits,
        "bench_search/results.json": {"hardware": hw, "config": {"sizes": [10_000, 1_000_000]}, "results": results},
        "bench_export/results.json": {"host": hw, "scene": "scene_a", "artefacts": arts},
    }
    for i, s in enumerate(SCENES):
        methods = {m: _metrics(0.3 + 0.05 * i, 10.0) for m in ("none", "qe", "gnn", "shortlist")}
        methods |= {m: _metrics(0.6 + 0.05 * i, 40.0, metric=True) for m in ("gnn+metric", FULL)}
        methods["gnn+metric@100"] = _metrics(0.1, 1.0)  # a subset row: left out of the tables
        out[f"refine/{s}/refine_eval.json"] = {"scene": s, "arbitrary": methods, "aligned": methods}
        cfog = {"recall@1": 0.65, "recall@5": 0.8, "recall@10": 0.85, "median_error_m": 200.0}
        cfog |= {"p90_error_m": 4000.0, "ms_per_query": 50.0 + 10 * i}
        out[f"loso/{s}/cfog/eval.json"] = {"scene": s, "arbitrary": cfog, "aligned": cfog, "host": hw}
    report = {"n_records": 6, "n_trusted": 5, "median_m": 3.7, "p90_m": 4.9, "max_m": 5.4, "within_50_pct": 100.0}
    out["flights/scene_a/flight_curve_s0.json"] = {
        "scene": "scene_a",
        "track": "curve",
        "seed": 0,
        "report": {**report, "false_fix_rate": 0.0},
        "latency_ms": {"encode": {"50": 1.4, "95": 3.2}, "total": {"50": 61.0, "95": 137.0}},
        "windows": 54,
        "windows_within_50m": 0.96,
    }
    out["demo/report.json"] = {
        **{"n_records": 12, "n_trusted": 12, "median_m": 8.8, "p90_m": 12.4, "max_m": 14.5, "within_50_pct": 100.0},
        "false_fix_rate": 0.0,
        "daemon": {"strips": 12, "windows": 216, "errors": 0},
        "mavlink": {"sent_GPS_INPUT": 74, "dropped_unsigned": 0},
    }
    return out


def _limit_row() -> dict:
    return {
        "what": "encoder ms/window",
        "measured_ms": 2.0,
        "floor_1t_ms": 0.5,
        "ratio_1t": 4.0,
        "floor_kind": "compute",
    }


def _argv(root: Path, gpu: Path | None = GPU_JSON) -> list[str]:
    """Arguments reading the JSON set under ``root``; the page and figures go to ``root/docs``."""
    return [
        *("--runs", str(root / "bench"), "--search", str(root / "bench_search/results.json")),
        *("--export", str(root / "bench_export/results.json"), "--refine", str(root / "refine")),
        *("--loso", str(root / "loso"), "--flights", str(root / "flights")),
        *("--demo", str(root / "demo/report.json"), "--demo-track", str(root / "demo/track.png")),
        *("--gpu", str(gpu if gpu is not None else root / "no_gpu.json"), "--gpu-archive", ""),
        *("--out", str(root / "docs/performance.md"), "--figures", str(root / "docs/figures")),
    ]


def _write_set(root: Path, data: dict[str, object]) -> None:
    for rel, d in data.items():
        _write(root / rel, d)
    (root / "demo").mkdir(parents=True, exist_ok=True)
    (root / "demo/track.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


@pytest.fixture(scope="module")
def full(perf_report, tmp_path_factory) -> tuple[str, dict[str, object], Path]:
    """The page rendered from the whole JSON set: (markdown, the JSON by path, the input root)."""
    root = tmp_path_factory.mktemp("perf")
    data = json_set()
    _write_set(root, data)
    assert perf_report.main(_argv(root)) == 0
    return (root / "docs/performance.md").read_text(), data, root


# ------------------------------------------------------------------------------------ reading the page


def sections(md: str) -> dict[str, str]:
    """``## title`` -> its text, in page order."""
    out: dict[str, str] = {}
    title = None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
            out[title] = ""
        elif title is not None:
            out[title] += line + "\n"
    return out


def tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Every Markdown table in ``text`` as (the heading or bold line above it, rows as {column: cell})."""
    found, label, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### ") or (line.startswith("**") and line.endswith("**")):
            label = line.strip("#* ")
        if line.startswith("|"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2  # the separator
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip("|").split("|")), strict=True)))
                i += 1
            found.append((label, rows))
        i += 1
    return found


def table_of(text: str, label: str) -> list[dict[str, str]]:
    return next(rows for lab, rows in tables(text) if lab == label)


def shows(cell: str, value: float, scale: float = 1.0) -> None:
    """``cell`` is ``value * scale`` rounded to the digits it shows."""
    s = cell.strip("* ").removesuffix("x").removesuffix("%").strip().replace(",", "")
    d = Decimal(s)
    tol = 0.5 * 10.0 ** d.as_tuple().exponent
    assert abs(float(d) - value * scale) <= tol * (1 + 1e-9) + 1e-12, (cell, value * scale)


# ------------------------------------------------------------------------------------------------ tests


def test_every_section_from_the_json_set(full) -> None:
    md, _, _ = full
    assert md.startswith("# Performance\n")
    assert list(sections(md)) == TITLES
    assert "not run" not in md and "not measured" not in md
    reproduce = sections(md)["Reproduce"]
    for script in ("bench_latency", "bench_limits", "bench_search", "bench_export", "refine_loso", "loso"):
        assert f"python benchmarks/{script}.py" in reproduce
    assert "sarloc demo" in reproduce and "bash benchmarks/gpu_check.sh" in reproduce


def test_latency_tables_show_the_json(full) -> None:
    md, data, _ = full
    d, text = data["bench/latency.json"], sections(md)["Onboard pipeline latency (CPU)"]
    rows = {r["stage"].removesuffix(" (per strip)"): r for r in table_of(text, "Per stage")}
    for stage, q in d["pipeline"]["stages"].items():
        for p in ("p50", "p95", "p99"):
            shows(rows[stage][f"{p} ms"], q[p])
    shows(rows["**total per window**"]["p99 ms"], d["pipeline"]["total"]["p99"])
    enc = {r["backend"]: r for r in table_of(text, "Encoder backends")}
    for backend, by_batch in d["encoder"].items():
        for batch, q in by_batch.items():
            shows(enc[backend][f"batch {batch}"].split(" (")[0], q["p50"])
    ratios = {r["ratio"]: r for r in tables(text)[2][1]}
    for batch in ("1", "8"):
        ratio = d["encoder"]["ort_int8"][batch]["p50"] / d["encoder"]["ort_fp32"][batch]["p50"]
        shows(ratios["INT8 / FP32"][f"batch {batch}"], ratio)
    scaling = table_of(text, "Scaling with the map")
    for row, s in zip(scaling, d["scaling"], strict=True):
        shows(row["tiles"], s["n_tiles"])
        shows(row["search p50 ms"], s["search_ms_p50"])
        shows(row["end-to-end p50 ms"], s["end_to_end_ms_p50"])
    assert "Machine: x86_64, Test CPU, 2 CPUs" in text


def test_limits_rows_and_quantities_show_the_json(full) -> None:
    md, data, _ = full
    d, text = data["bench/limits.json"], sections(md)["Measured vs physical floor"]
    (row,) = table_of(text, "encoder")
    src = d["encoder"]["rows"][0]
    assert row["what"] == src["what"] and row["bound by"] == src["floor_kind"]
    shows(row["measured ms"], src["measured_ms"])
    shows(row["measured / floor (1 thread)"], src["ratio_1t"])
    quantities = {r["quantity"].strip("`"): r["value"] for r in table_of(text, "quantities")}
    assert set(quantities) == {"peak_gflops", "encoder.flops"}
    shows(quantities["encoder.flops"], d["encoder"]["flops"])


def test_search_table_and_targets_follow_the_json(full) -> None:
    md, data, _ = full
    results, text = data["bench_search/results.json"]["results"], sections(md)["Map search scaling"]
    rows = {(r["tiles"], r["method"]): r for r in table_of(text, "704-dimensional embeddings")}
    assert len(rows) == len(results)
    for r in results:
        row = rows[(f"{r['n_tiles']:,}", r["method"])]
        shows(row["p50 ms"], r["p50_ms"])
        shows(row["p99 ms"], r["p99_ms"])
        shows(row["recall@10"], r["recall@10"])
        meets = r["p50_ms"] <= 10 and r["recall@10"] >= 0.99
        assert row["target"] == ("" if r["n_tiles"] != 1_000_000 else "**met**" if meets else "missed")
    targets = {r["target"]: r for r in table_of(sections(md)["Summary (2-minute read)"], "")}
    search = targets["1,000,000-tile search <= 10 ms at recall@10 >= 0.99 (D=704)"]
    assert search["status"] == "**met**" and "`ivf` 8.00 ms" in search["measured"]
    faiss = targets["exact search at least as fast as FAISS flat on the same data (10k-1M tiles, one query)"]
    assert faiss["status"] == "missed" and f"({150 / 200:.2f}x)" in faiss["measured"]  # slower at 1M tiles


def test_export_and_its_target_follow_the_json(full) -> None:
    md, data, _ = full
    arts, text = data["bench_export/results.json"]["artefacts"], sections(md)["Export: INT8 vs FP32"]
    rows = {r["artefact"]: r for r in tables(text)[0][1]}
    for name, a in arts.items():
        shows(rows[name]["dense R@1"], a["dense"]["recall@1"])
        shows(rows[name]["size KB"], a["size_kb"])
        shows(rows[name]["p50 ms/window batch1"], a["latency_ms_per_window"]["batch1"]["p50"])
    diff = 100 * (arts["ort_int8"]["dense"]["recall@1"] - arts["ort_fp32"]["dense"]["recall@1"])
    (target,) = [r for r in tables(sections(md)["Summary (2-minute read)"])[0][1] if r["target"].startswith("INT8")]
    assert f"({diff:+.1f} points)" in target["measured"] and target["status"] == "**met**"


def test_accuracy_tables_show_the_json(full) -> None:
    md, data, _ = full
    text = sections(md)["Held-out accuracy: full path vs classical CFOG"]
    ref = {s: data[f"refine/{s}/refine_eval.json"]["arbitrary"] for s in SCENES}
    cfog = {s: data[f"loso/{s}/cfog/eval.json"]["arbitrary"] for s in SCENES}
    rows = {r["held-out scene"]: r for r in table_of(text, "Per scene (arbitrary queries)")}
    for s in SCENES:
        shows(rows[s]["full path R@1"], ref[s][FULL]["recall@1"])
        shows(rows[s]["coarse R@1"], ref[s]["none"]["recall@1"])
        shows(rows[s]["CFOG ms/query"], cfog[s]["ms_per_query"])
        shows(rows[s]["full / CFOG time"], ref[s][FULL]["ms_per_query"] / cfog[s]["ms_per_query"], 100)
    mean_r1 = sum(ref[s][FULL]["recall@1"] for s in SCENES) / len(SCENES)
    shows(rows["**mean of common scenes**"]["full path R@1"], mean_r1)
    methods = {r["method"]: r for r in table_of(text, "Mean over 2 scene(s), aligned queries")}
    assert len(methods) == 7 and not any("@" in m for m in methods)  # 6 methods + CFOG, no subset rows
    shows(methods["graph refiner (GNN)"]["R@5"], sum(ref[s]["gnn"]["recall@5"] for s in SCENES) / 2)
    conf = {r["held-out scene"]: r for r in table_of(text, "Confidence of the full path (arbitrary queries)")}
    shows(conf["scene_b"]["ECE"], ref["scene_b"][FULL]["ece"])
    summary = sections(md)["Summary (2-minute read)"]
    assert f"{100 * 40 / 60:.1f}-{100 * 40 / 50:.1f} % over 2 scene(s)" in summary  # 1 % target: missed


def test_flight_and_demo_tables_show_the_json(full) -> None:
    md, data, _ = full
    flight = data["flights/scene_a/flight_curve_s0.json"]
    (row,) = tables(sections(md)["Simulated flights over held-out scenes"])[0][1]
    assert (row["scene"], row["track"], row["prior m"]) == ("scene_a", "curve", "none")
    shows(row["median m"], flight["report"]["median_m"])
    shows(row["windows <= 50 m"], flight["windows_within_50m"], 100)
    lat = {r["stage"]: r for r in tables(sections(md)["Simulated flights over held-out scenes"])[1][1]}
    assert lat["**total**"]["scene_a curve"] == "61.0 / 137"
    demo = data["demo/report.json"]
    values = {r["quantity"]: r["value"] for r in tables(sections(md)["Flight demo over a generated scene"])[0][1]}
    for cell, key in zip(
        values["median / p90 / max error m"].split(" / "), ("median_m", "p90_m", "max_m"), strict=True
    ):
        shows(cell, demo[key])
    assert values["MAVLink sent"] == "GPS_INPUT 74"


def test_gpu_section_shows_the_committed_run(full) -> None:
    md, _, _ = full
    d = json.loads(GPU_JSON.read_text())
    text = sections(md)["GPU"]
    enc = {(r["mode"], r["batch"]): r for r in table_of(text, "Encoder")}
    for mode, by_batch in d["encoder"].items():
        for batch, q in by_batch.items():
            shows(enc[(mode, batch)]["p50 ms/call"], q["p50_ms"])
            shows(enc[(mode, batch)]["ms/window"], q["ms_per_window"])
    for mode, by_batch in d["cuda_graph"].items():
        for batch, q in by_batch.items():
            shows(enc[(mode + " + CUDA graph", batch)]["p95 ms/call"], q["p95_ms"])
    parity = {r["mode"]: r for r in table_of(text, "Parity with CPU FP32")}
    assert {m: r["passed"] for m, r in parity.items()} == {m: str(p["passed"]) for m, p in d["parity"].items()}
    search = {r["batch"]: r for r in table_of(text, "Brute-force search on the device")}
    for b in d["search"]["batch_sizes"]:
        shows(search[str(b)]["ms/query"], d["search"][f"batch_{b}"]["ms_per_query"])
    train = table_of(text, "Training on the device")
    for row, run in zip(train, ("single", "ddp"), strict=True):
        info = json.loads((GPU_JSON.parent / f"gpu_train/train_{run}/checkpoint.json").read_text())
        info = info.get("train_info") or info.get("info") or info
        shows(row["steps"], info["steps_done"])
        shows(row["steps/s"], info["steps_done"] / info["train_seconds"])
    summary = sections(md)["Summary (2-minute read)"]
    assert "(GPU brute force, batch 1) | 0.449 ms per query" in summary


def test_summary_counts_its_targets(full) -> None:
    md, _, _ = full
    summary = sections(md)["Summary (2-minute read)"]
    targets = tables(summary)[0][1]
    assert f"Targets: {len(targets)} (" in summary and len(targets) == 5
    statuses = [r["status"].strip("*") for r in targets]
    assert statuses.count("met") == 3 and statuses.count("missed") == 2
    headlines = {r["what"]: r["section"] for r in tables(summary)[1][1]}
    assert set(headlines.values()) <= set(TITLES)


def test_plots_are_written_and_deterministic(perf_report, full) -> None:
    md, _, root = full
    figures = root / "docs/figures"
    assert {p.name for p in figures.iterdir()} == PLOTS
    for name in PLOTS:
        assert f"(figures/{name})" in md
        data = (figures / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 300_000
    before = {n: (figures / n).read_bytes() for n in PLOTS}
    assert perf_report.main(_argv(root)) == 0
    assert (root / "docs/performance.md").read_text() == md
    assert {n: (figures / n).read_bytes() for n in PLOTS} == before


def test_missing_json_says_not_measured(perf_report, tmp_path: Path) -> None:
    assert perf_report.main(_argv(tmp_path, gpu=None)) == 0  # nothing under tmp_path
    md = (tmp_path / "docs/performance.md").read_text()
    assert list(sections(md)) == TITLES
    for title, text in sections(md).items():
        if title in ("Summary (2-minute read)", "Reproduce"):
            continue
        first = text.strip().splitlines()[0]
        assert first.startswith(("not run: `python benchmarks/", "not run: `sarloc demo", "No GPU was lent")), title
    targets = tables(sections(md)["Summary (2-minute read)"])[0][1]
    assert targets and {r["status"] for r in targets} == {"not measured"}
    assert not (tmp_path / "docs/figures").exists()


def test_some_json_missing_leaves_the_rest(perf_report, tmp_path: Path) -> None:
    data = {k: v for k, v in json_set().items() if not k.startswith(("bench/latency", "refine/", "loso/"))}
    _write_set(tmp_path, data)
    assert perf_report.main(_argv(tmp_path, gpu=None)) == 0
    md = (tmp_path / "docs/performance.md").read_text()
    parts = sections(md)
    assert parts["Onboard pipeline latency (CPU)"].strip().startswith("not run: `python benchmarks/bench_latency.py")
    assert (
        parts["Held-out accuracy: full path vs classical CFOG"].strip().startswith("not run: `python benchmarks/loso")
    )
    assert "not run" not in parts["Map search scaling"] + parts["Export: INT8 vs FP32"]
    targets = {r["target"]: r["status"] for r in tables(parts["Summary (2-minute read)"])[0][1]}
    assert targets["encoder + search + refine per window <= 1% of the classical per-query time"] == "not measured"
    names = {p.name for p in (tmp_path / "docs/figures").iterdir()}
    assert names == PLOTS - {
        "perf_latency_stages.png",
        "perf_recall_at_k.png",
        "perf_error_cdf.png",
        "perf_reliability.png",
    }


def test_unreadable_json_is_named(perf_report, tmp_path: Path) -> None:
    _write(tmp_path / "bench/limits.json", [1, 2])
    (tmp_path / "bench/latency.json").write_text("{not json")
    assert perf_report.main(_argv(tmp_path, gpu=None)) == 0
    parts = sections((tmp_path / "docs/performance.md").read_text())
    assert (
        parts["Onboard pipeline latency (CPU)"]
        .strip()
        .startswith(f"could not read `{tmp_path / 'bench/latency.json'}`")
    )
    assert "holds no JSON object" in parts["Measured vs physical floor"]
    assert "To produce it: `python benchmarks/bench_limits.py" in parts["Measured vs physical floor"]


@pytest.mark.parametrize(
    ("int8_r1", "ivf_ms", "int8_status", "search_status"),
    [(0.47, 8.0, "met", "met"), (0.45, 12.0, "missed", "met with a prior only")],
)
def test_target_status_follows_the_numbers(perf_report, tmp_path, int8_r1, ivf_ms, int8_status, search_status) -> None:
    from report import Report
    from report.export import section_export
    from report.search import section_search

    data = json_set()
    data["bench_export/results.json"]["artefacts"]["ort_int8"]["dense"]["recall@1"] = int8_r1
    for r in data["bench_search/results.json"]["results"]:
        r["p50_ms"] = ivf_ms if (r["method"], r["n_tiles"]) == ("ivf", 1_000_000) else r["p50_ms"]
    _write_set(tmp_path, data)
    rep = Report(figures_dir=tmp_path / "figures", doc_dir=tmp_path)
    section_export(rep, [tmp_path / "bench_export/results.json"], "cmd")
    section_search(rep, tmp_path / "bench_search/results.json", "cmd")
    assert [status for _, _, status in rep.targets][:2] == [int8_status, search_status]
