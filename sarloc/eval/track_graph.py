"""The candidates of a strip's consecutive windows as one graph, against the hand-made strip consensus (torch-free).

The daemon's strip consensus (:func:`sarloc.runtime.fusion.strip_consensus`) votes over each window's *chosen*
candidate. A window whose chosen candidate is wrong may still hold the right place among its other refined
candidates, and a wrong place rarely repeats across windows where the strip geometry says it should. The track
graph takes every refined candidate of every window of a strip (the window records' ``alternatives``), moves each
to the strip's reference time by the strip geometry (the velocity of the strip's ``fix`` record: metadata heading
and speed), and scores each node from its own evidence and from the nodes of *other* windows near it on the
ground. This module builds those graphs from daemon records, labels them against a flight's truth, turns node
probabilities into a strip fix and scores fixes; the model and its training are in
:mod:`sarloc.trainer.track_graph`.

Node features (:data:`NODE_FEATURES`): the verifier probability (as a clipped logit), the refiner score minus the
window's best, the registration score and its second-peak ratio, whether the node is its window's choice, its rank,
and two geometric counts: the share of the strip's other windows with a candidate within ``gate_m`` of it, and the
summed verifier probability of those candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NODE_FEATURES = (
    "logit_p",
    "refiner_minus_best",
    "reg_score",
    "reg_second_ratio",
    "chosen",
    "rank",
    "support",
    "support_p",
)
FALSE_RADIUS_M = 200.0  # a trusted fix farther than this from the truth is false (as in ``sarloc report``)
RIGHT_M = 50.0  # a candidate whose implied vehicle position is within this of the truth is right


@dataclass
class StripGraph:
    """The candidates of one strip's windows.

    Attributes:
        key: ``scene/run/strip_id``.
        t_ref_s: the strip fix's reference time.
        xy_m: (N, 2) implied vehicle positions at ``t_ref_s`` (east, north).
        window: (N,) index of each node's window within the strip.
        feats: (N, len(NODE_FEATURES)) node features.
        right: (N,) bool, node within :data:`RIGHT_M` of the truth (None without a truth).
        truth_xy_m: the true vehicle position at ``t_ref_s`` (None without a truth).
        consensus: the daemon's decision: its strip fix, or for a window graph whether the window reached the
            navigation filter: ``{"trusted": bool, "xy_m": (x, y) or None}``.
        target: for a window graph (the strip's windows up to one window, as the daemon has them when that window
            arrives), the index in ``window`` of the window being decided; None for a whole-strip graph.
    """

    key: str
    t_ref_s: float
    xy_m: np.ndarray
    window: np.ndarray
    feats: np.ndarray
    right: np.ndarray | None
    truth_xy_m: np.ndarray | None
    consensus: dict
    target: int | None = None


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(q / (1 - q))


def strip_graph(key: str, windows: list[dict], fix: dict, gate_m: float = 30.0, truth=None) -> StripGraph | None:
    """The graph of one strip from its window records and its ``fix`` record (None when no window has candidates).

    ``truth``: a callable ``t_s -> (east, north)`` of the true vehicle position, for labels.
    """
    t_ref = float(fix["t_s"])
    vel = np.asarray(fix.get("vel_mps") or (0.0, 0.0), float)
    xy, win, rows = [], [], []
    for wi, w in enumerate(windows):
        alts = w.get("alternatives") or []
        if not alts or w.get("xy_m") is None or w.get("vehicle_xy_m") is None:
            continue
        a = np.asarray(alts, float)
        off = np.asarray(w["vehicle_xy_m"], float) - np.asarray(w["xy_m"], float)  # window centre -> vehicle
        veh = a[:, :2] + off
        xy.append(veh - vel * (float(w["t_s"]) - t_ref))
        p, ref, reg, second = a[:, 2], a[:, 3], a[:, 4], a[:, 5]
        rank = np.argsort(np.argsort(-p, kind="stable"), kind="stable")
        chosen = np.all(np.abs(a[:, :2] - np.asarray(w["xy_m"], float)) < 0.05, axis=1)
        ratio = np.where(reg > 1e-6, second / np.maximum(reg, 1e-6), 1.0)
        rows.append(
            np.stack(
                [
                    _logit(p),
                    ref - ref.max(),
                    reg,
                    np.clip(ratio, 0, 2),
                    chosen.astype(float),
                    rank / max(len(a) - 1, 1),
                    np.zeros(len(a)),
                    np.zeros(len(a)),
                ],
                1,
            )
        )
        win.append(np.full(len(a), wi))
    if not xy:
        return None
    xy_a, win_a, feats = np.concatenate(xy), np.concatenate(win), np.concatenate(rows)
    n_win = len(np.unique(win_a))
    d = np.linalg.norm(xy_a[:, None] - xy_a[None], axis=-1)
    other = win_a[:, None] != win_a[None]
    near = (d <= gate_m) & other
    p_all = 1.0 / (1.0 + np.exp(-feats[:, 0]))
    for i in range(len(xy_a)):  # per other window: does it hold a candidate near node i, and its best probability
        ws = np.unique(win_a[near[i]])
        feats[i, 6] = len(ws) / max(n_win - 1, 1)
        feats[i, 7] = sum(float(p_all[near[i] & (win_a == w)].max()) for w in ws)
    right = truth_xy = None
    if truth is not None:
        truth_xy = np.asarray(truth(t_ref), float)
        right = np.linalg.norm(xy_a - truth_xy, axis=1) <= RIGHT_M
    cons = {"trusted": bool(fix.get("trusted")), "xy_m": fix.get("xy_m")}
    return StripGraph(key, t_ref, xy_a, win_a, feats.astype(np.float32), right, truth_xy, cons)


def _read_run(run_dir: Path, truth_path: Path | None) -> tuple[list[dict], dict[str, list[dict]], Callable | None]:
    """A daemon run's records, its window records per strip and the flight's truth as ``t_s -> (east, north)``."""
    from sarloc.eval.replay import read_records
    from sarloc.eval.scoring import load_truth, truth_at

    recs = read_records(Path(run_dir) / "records.jsonl")
    wins: dict[str, list[dict]] = {}
    for r in recs:
        if r.get("type") == "window":
            wins.setdefault(r["strip_id"], []).append(r)
    if truth_path is None:
        return recs, wins, None
    tr = load_truth(truth_path)
    return recs, wins, lambda t: truth_at(tr, t)


def graphs_from_run(run_dir: Path, truth_path: Path | None, key: str, gate_m: float = 30.0) -> list[StripGraph]:
    """Strip graphs of one daemon run (its ``records.jsonl``), labelled with the flight's ``truth.json`` if given."""
    recs, wins, truth = _read_run(run_dir, truth_path)
    out = []
    for r in recs:
        if r.get("type") == "fix" and r.get("strip_id") in wins:
            g = strip_graph(f"{key}/{r['strip_id']}", wins[r["strip_id"]], r, gate_m, truth)
            if g is not None:
                out.append(g)
    return out


NOT_TO_FILTER = ("untrusted", "held: no agreeing window yet", "no clock")


def window_graphs_from_run(
    run_dir: Path, truth_path: Path | None, key: str, gate_m: float = 30.0, depth: int = 8
) -> list[StripGraph]:
    """One graph per window, causal: the candidates of that window and of up to ``depth - 1`` earlier windows of
    its strip, moved to the window's time. ``consensus`` is what the daemon did with the window: whether it reached
    the navigation filter (trusted and corroborated; the filter's gate comes after) and its implied position."""
    recs, wins, truth = _read_run(run_dir, truth_path)
    late = {(r["strip_id"], r["index"]) for r in recs if r.get("type") == "window_late"}
    vel = {r["strip_id"]: r.get("vel_mps") for r in recs if r.get("type") == "fix"}
    out = []
    for sid, ws in wins.items():
        ws = sorted(ws, key=lambda w: w["index"])
        for i, w in enumerate(ws):
            sub = ws[max(0, i - depth + 1) : i + 1]
            fix = {"t_s": float(w["t_s"]), "vel_mps": vel.get(sid)}
            g = strip_graph(f"{key}/{sid}/{w['index']}", sub, fix, gate_m, truth)
            if g is None or not np.any(g.window == len(sub) - 1):
                continue  # this window abstained: nothing to decide
            reached = str(w.get("nav")) not in NOT_TO_FILTER or (sid, w["index"]) in late
            g.consensus = {"trusted": bool(reached and w.get("trusted")), "xy_m": w.get("vehicle_xy_m")}
            g.target = len(sub) - 1
            out.append(g)
    return out


def window_decision(g: StripGraph, prob: np.ndarray, threshold: float, gate_m: float = 30.0) -> dict:
    """A window graph's decision: the window's most probable candidate, trusted when it reaches ``threshold``."""
    own = np.flatnonzero(g.window == g.target)
    best = int(own[np.argmax(prob[own])])
    return {"trusted": bool(prob[best] >= threshold), "xy_m": [float(v) for v in g.xy_m[best]], "p": float(prob[best])}


def graph_fix(g: StripGraph, prob: np.ndarray, threshold: float, gate_m: float = 30.0) -> dict:
    """The strip fix from node probabilities: the best node and the nodes within ``gate_m`` of it that are at least
    half as likely (probability-weighted mean); trusted when the best node's probability reaches ``threshold``."""
    best = int(np.argmax(prob))
    near = (np.linalg.norm(g.xy_m - g.xy_m[best], axis=1) <= gate_m) & (prob >= 0.5 * prob[best])
    w = prob[near]
    xy = (g.xy_m[near] * w[:, None]).sum(0) / max(float(w.sum()), 1e-12)
    return {"trusted": bool(prob[best] >= threshold), "xy_m": [float(xy[0]), float(xy[1])], "p": float(prob[best])}


def fix_error_m(g: StripGraph, fix: dict) -> float:
    """Distance of a strip fix from the truth (inf without a position)."""
    if fix.get("xy_m") is None or g.truth_xy_m is None:
        return math.inf
    return float(np.hypot(*(np.asarray(fix["xy_m"], float) - g.truth_xy_m)))


def score(graphs: list[StripGraph], fixes: list[dict]) -> dict:
    """Trusted fixes, false fixes (trusted and more than :data:`FALSE_RADIUS_M` off) and errors of one method."""
    err = np.array([fix_error_m(g, f) for g, f in zip(graphs, fixes, strict=True)])
    tr = np.array([bool(f["trusted"]) for f in fixes])
    ok = tr & (err <= FALSE_RADIUS_M)
    return {
        "strips": len(graphs),
        "trusted": int(tr.sum()),
        "trusted_right": int(ok.sum()),
        "false": int((tr & (err > FALSE_RADIUS_M)).sum()),
        "trusted_rate": float(tr.mean()) if len(tr) else None,
        "median_m": float(np.median(err[ok])) if ok.any() else None,
        "p90_m": float(np.percentile(err[ok], 90)) if ok.any() else None,
    }


def paired(graphs: list[StripGraph], a: list[dict], b: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two methods' trusted-and-right strips: b's wins and losses against a, an exact
    McNemar p-value and a bootstrap 95 % interval of the difference in the trusted-and-right rate (b - a)."""
    ea = np.array([fix_error_m(g, f) for g, f in zip(graphs, a, strict=True)])
    eb = np.array([fix_error_m(g, f) for g, f in zip(graphs, b, strict=True)])
    ra = np.array([f["trusted"] for f in a]) & (ea <= FALSE_RADIUS_M)
    rb = np.array([f["trusted"] for f in b]) & (eb <= FALSE_RADIUS_M)
    wins, losses = int((rb & ~ra).sum()), int((ra & ~rb).sum())
    n = wins + losses
    k = min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    rng = np.random.default_rng(seed)
    diff = (rb.astype(float) - ra.astype(float)) if len(ra) else np.zeros(1)
    boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)]
    return {
        "wins": wins,
        "losses": losses,
        "mcnemar_p": float(p),
        "diff": float(diff.mean()),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
    }


__all__ = [
    "NODE_FEATURES",
    "StripGraph",
    "graph_fix",
    "graphs_from_run",
    "paired",
    "score",
    "strip_graph",
    "window_decision",
    "window_graphs_from_run",
]
