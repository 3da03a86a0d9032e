"""The leave-one-scene-out results' vocabulary: re-ranking methods, their labels, and readers of one run's JSON."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .common import num

FULL_PATH = "shortlist+gnn+metric"
COARSE = "none"
KINDS = ("arbitrary", "aligned")
METHODS = (
    "none",
    "qe",
    "kreciprocal",
    "spatial",
    "gnn",
    "none+metric",
    "gnn+metric",
    "shortlist",
    "shortlist+gnn",
    "shortlist+metric",
    "shortlist+gnn+metric",
)
LABELS = {
    "none": "coarse (no re-ranking)",
    "qe": "alpha query expansion",
    "kreciprocal": "k-reciprocal",
    "spatial": "spatial vote",
    "gnn": "graph refiner (GNN)",
    "none+metric": "coarse + metric verification",
    "gnn+metric": "GNN + metric verification",
    "shortlist": "pool + low-res shortlist",
    "shortlist+gnn": "pool + shortlist + GNN",
    "shortlist+metric": "pool + shortlist + metric verification",
    "shortlist+gnn+metric": "**full path** (pool + shortlist + GNN + metric verification)",
    "cfog": "classical CFOG (whole map)",
}


def kind_of(d: dict, kind: str) -> dict:
    """The metrics of one kind of query (``arbitrary``/``aligned``), under ``results`` or at the top level."""
    r = d.get("results", d) if isinstance(d.get("results"), dict) else d
    v = r.get(kind)
    return v if isinstance(v, dict) else {}


def mean(xs: Iterable[Any]) -> float | None:
    """The mean of the finite numbers among ``xs``, None when there are none."""
    v = [float(x) for x in xs if num(x) is not None]
    return float(np.mean(v)) if v else None


def methods_of(ref: dict[str, dict], kind: str) -> list[str]:
    """The methods present in any scene, in the table's order; subset rows (``method@N``) left out."""
    seen = {m for d in ref.values() for m in kind_of(d, kind) if isinstance(kind_of(d, kind).get(m), dict)}
    return [m for m in METHODS if m in seen] + sorted(m for m in seen if m not in METHODS and "@" not in m)
