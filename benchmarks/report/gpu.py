"""Section "GPU" from ``benchmarks/gpu_check.sh``'s ``gpu_check.json`` and ``gpu_train_check.sh``'s run folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .common import (
    DASH,
    NOT_NUMBERS,
    SEARCH_TARGET_MS,
    SEARCH_TARGET_RECALL,
    SEARCH_TARGET_TILES,
    Report,
    cols,
    flatten,
    fx,
    g,
    header,
    load,
    machine,
    ms,
    num,
    rel,
    row_lists,
    table,
)

TITLE = "GPU"
KNOWN = {
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


def gpu_machine(d: dict) -> str:
    """The GPU, driver and software of gpu_check.json's ``meta`` (falls back to the generic reader)."""
    m = d.get("meta") or {}
    if not any(k in m for k in ("gpu", "device", "torch")):
        return machine(d)
    parts = [str(m.get("gpu") or m.get("device"))]
    if m.get("capability"):
        parts.append(f"compute capability {m['capability']}")
    if num(m.get("gpu_mem_gib")):
        parts.append(f"{m['gpu_mem_gib']:.0f} GiB")
    if m.get("nvidia_smi"):
        parts.append(f"nvidia-smi: {m['nvidia_smi']}")
    sw = [f"{k} {m[k]}" for k in ("torch", "torch_cuda", "cudnn", "python", "sarloc") if m.get(k) is not None]
    return ", ".join(parts) + ("; " + ", ".join(sw) if sw else "")


def section_gpu(rep: Report, paths: Sequence[Path], command: str) -> None:
    rep.commands.append((TITLE, command))
    found = next((p for p in paths if Path(p).is_file()), None)
    d, err = load(found)
    if d is None:
        where = " or ".join(f"`{rel(p)}`" for p in paths)
        msg = err or f"No GPU was lent to this task; `{command}` is the prepared script (it writes {where})."
        rep.sections.append(["", f"## {TITLE}", "", msg])
        rep.headlines.append(("GPU", "no GPU was lent to this task", TITLE))
        return
    meta, cfg = d.get("meta") or {}, d.get("config") or {}
    cmd = meta.get("command") or d.get("command") or command
    if cfg.get("checkpoint") not in (None, "None") and "--checkpoint" not in cmd:
        cmd += f" --checkpoint {cfg['checkpoint']}"
    out = header(TITLE, cmd, gpu_machine(d))
    out += ["", f"From `{rel(found)}`."]
    peaks = d.get("peaks") or {}
    if peaks:
        vals = [f"{k} {g(v)}" for k, v in peaks.items() if k.endswith(("tflops", "gbs"))]
        out += ["", "Peaks: " + ", ".join(vals) + "."]
    out += _encoder(d)
    out += _parity(d.get("parity") or {})
    out += _device_search(rep, d.get("search") or {})
    out += _gpu_training(Path(found).parent / "gpu_train")
    errors = d.get("errors") or {}
    if errors:
        out += ["", "Errors:", ""] + [
            f"* `{k}`: {str(v).strip().splitlines()[-1] if str(v).strip() else v}" for k, v in errors.items()
        ]
    out += _unknown(d)
    rep.headlines.append(("GPU", f"checked on {gpu_machine(d).split(';')[0]}", TITLE))
    rep.sections.append(out)


def _encoder(d: dict) -> list[str]:
    """Encoder timings per mode and batch, with and without CUDA graphs."""
    rows = []
    for label, group in (("", d.get("encoder") or {}), (" + CUDA graph", d.get("cuda_graph") or {})):
        for mode, by_batch in group.items():
            if not isinstance(by_batch, dict):
                continue
            for b, r in by_batch.items():
                if isinstance(r, dict):
                    rows.append(
                        [
                            mode + label,
                            str(b),
                            ms(r.get("p50_ms")),
                            ms(r.get("p95_ms")),
                            ms(r.get("ms_per_window")),
                            g(round(r["windows_per_s"])) if num(r.get("windows_per_s")) else DASH,
                        ]
                    )
    if not rows:
        return []
    info = d.get("encoder_info") or {}
    fl = num(info.get("flops_per_window"))
    return [
        "",
        "### Encoder",
        "",
        f"Weights: {info.get('weights', DASH)}" + (f"; {fl / 1e6:.1f} MFLOP/window." if fl else "."),
        "",
        *table(cols("mode|batch|p50 ms/call|p95 ms/call|ms/window|windows/s"), rows),
    ]


def _parity(par: dict) -> list[str]:
    if not par:
        return []
    rows = [
        [
            m,
            g(p.get("windows")),
            g(p.get("max_abs_diff")),
            fx(p.get("min_cosine"), 6),
            fx(p.get("min_cosine_learned"), 6),
            str(p.get("passed", DASH)),
        ]
        for m, p in par.items()
        if isinstance(p, dict)
    ]
    spec = "mode|windows|max abs diff|min cosine|min cosine (learned part)|passed"
    return ["", "### Parity with CPU FP32", "", *table(cols(spec), rows)]


def _device_search(rep: Report, srch: dict) -> list[str]:
    """Brute-force search timings, the check against the CPU, and the 1M-tile target on the GPU."""
    if not srch:
        return []
    rows = []
    for b in srch.get("batch_sizes") or []:
        x = srch.get(f"batch_{b}") or {}
        rows.append(
            [
                str(b),
                ms(x.get("p50_ms")),
                ms(x.get("p95_ms")),
                ms(x.get("ms_per_query")),
                g(round(x["queries_per_s"])) if num(x.get("queries_per_s")) else DASH,
                fx(x.get("read_gbs"), 0),
            ]
        )
    db = num(srch.get("db_bytes"))
    out = [
        "",
        "### Brute-force search on the device",
        "",
        f"{g(srch.get('n_tiles'))} x {g(srch.get('dim'))} float16"
        + (f" ({db / 1e9:.2f} GB)" if db else "")
        + f", matmul + top-{g(srch.get('k'))}.",
        "",
        *table(cols("batch|p50 ms/call|p95 ms/call|ms/query|queries/s|read GB/s"), rows),
    ]
    chk = srch.get("check") or {}
    if chk:
        out += [
            "",
            f"Top-10 against a CPU float32 reference on {g(chk.get('queries'))} queries: overlap "
            f"{fx(chk.get('top10_overlap_mean'), 3)}, passed: {chk.get('passed', DASH)}.",
        ]
    n, q1 = srch.get("n_tiles"), num((srch.get("batch_1") or {}).get("ms_per_query"))
    overlap = num(chk.get("top10_overlap_mean"))
    if isinstance(n, int) and n >= SEARCH_TARGET_TILES and q1 is not None:
        ok = q1 <= SEARCH_TARGET_MS and (overlap is None or overlap >= SEARCH_TARGET_RECALL)
        rep.targets.append(
            (
                f"{SEARCH_TARGET_TILES:,}-tile search <= {SEARCH_TARGET_MS:g} ms (GPU brute force, batch 1)",
                f"{ms(q1)} ms per query at {g(n)} x {g(srch.get('dim'))}, top-10 overlap {fx(overlap, 3)}",
                "met" if ok else "missed",
            )
        )
    return out


def _unknown(d: dict) -> list[str]:
    """Parts of the JSON this report does not know, shown generically (row lists as tables, then scalars)."""
    rest = {k: v for k, v in d.items() if k not in KNOWN and k not in NOT_NUMBERS}
    out = []
    for name, rl in row_lists(rest):
        keys = list(dict.fromkeys(k for r in rl for k, v in r.items() if not isinstance(v, (dict, list))))
        out += ["", f"**{name}**", "", *table(keys, [[g(r.get(k)) for k in keys] for r in rl])]
    scalars = flatten(rest)
    if scalars:
        out += ["", *table(["quantity", "value"], [[f"`{k}`", g(v)] for k, v in scalars])]
    return out


def _gpu_training(folder: Path) -> list[str]:
    """Rows of ``benchmarks/gpu_train_check.sh`` (its $OUT/train_*/checkpoint.json), when it ran."""
    rows = []
    for run in ("single", "ddp"):
        d, _ = load(folder / f"train_{run}" / "checkpoint.json")
        if not d:
            continue
        info, cfg = d.get("train_info") or d.get("info") or d, d.get("config") or {}
        steps, secs = num(info.get("steps_done")), num(info.get("train_seconds"))
        bs = num(cfg.get("batch_size"))
        rows.append(
            [
                "python -m sarloc.cli train" if run == "single" else "torchrun (DDP, NCCL)",
                g(info.get("world_size")),
                str(info.get("device", DASH)),
                g(steps),
                g(secs),
                fx(steps / secs, 1) if steps and secs else DASH,
                g(round(steps * bs * num(info.get("world_size") or 1) / secs)) if steps and secs and bs else DASH,
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
        *table(cols("run|processes|device|steps|seconds|steps/s|pairs/s"), rows),
    ]
