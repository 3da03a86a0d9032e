"""The dataset registry: names, ``NAME[@SPLIT]:ROOT`` specs, detection from a root folder, and opening."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sarloc.core.errors import ConfigError
from sarloc.trainer.data.datasets.base import Layout, Listing, PairSource
from sarloc.trainer.data.datasets.matching import OsDataset, QxsSaropt, Sar2Opt
from sarloc.trainer.data.datasets.sentinel import Sen12, Sen12ms
from sarloc.trainer.data.datasets.spacenet import SpaceNet6

logger = logging.getLogger(__name__)

#: the supported datasets by registry name, in detection order
LAYOUTS: dict[str, Layout] = {
    lay.name: lay for lay in (Sen12(), Sen12ms(), QxsSaropt(), OsDataset(), Sar2Opt(), SpaceNet6())
}
#: other spellings accepted for the names (compared lower-case, ``_`` read as ``-``)
ALIASES = {
    "sen12": "sen1-2",
    "sen1-2": "sen1-2",
    "sen12ms": "sen12ms",
    "sen12ms-cr": "sen12ms",
    "qxs": "qxs-saropt",
    "qxs-saropt": "qxs-saropt",
    "qxslab-saropt": "qxs-saropt",
    "os": "osdataset",
    "os-dataset": "osdataset",
    "osdataset": "osdataset",
    "sar2opt": "sar2opt",
    "spacenet6": "spacenet6",
    "spacenet-6": "spacenet6",
    "sn6": "spacenet6",
    "msaw": "spacenet6",
}


def canonical_name(name: str) -> str | None:
    """The registry name of ``name`` (any accepted spelling), or None."""
    return ALIASES.get(name.strip().lower().replace("_", "-"))


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` value: ``NAME[@SPLIT]:ROOT``, or a bare ``ROOT`` (the dataset is detected)."""

    name: str | None
    split: str | None
    root: Path


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``"sen12ms:/data/SEN12MS"``, ``"sar2opt@test:/data/SAR2Opt"``, ``"auto:/data/x"`` or ``"/data/x"``.

    Raises:
        ConfigError: an empty root, or an unknown name in front of the colon.
    """
    head, sep, rest = text.partition(":")
    name, _, split = head.partition("@")
    if sep and rest and (canonical_name(name) or name.lower() == "auto"):
        if not rest.strip():
            raise ConfigError(f"--dataset {text!r}: no folder after the colon")
        return DatasetSpec(canonical_name(name), split or None, Path(rest))
    if sep and "@" in head and not canonical_name(name):  # looks like NAME@SPLIT:ROOT with a wrong name
        raise ConfigError(f"--dataset {text!r}: unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    if not text.strip():
        raise ConfigError("--dataset: empty value; give NAME:ROOT (known: " + ", ".join(LAYOUTS) + ")")
    return DatasetSpec(None, None, Path(text))


def _show(root: Path, limit: int = 6) -> str:
    """The first entries of ``root``, for error messages."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return "nothing readable"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "nothing"


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} not found" if not root.exists() else f"{root} is not a folder")


def detect_dataset(root: str | Path) -> str:
    """The registry name of the dataset whose published layout ``root`` holds.

    Raises:
        ConfigError: one line naming ``root``, every layout tried and what it lacked; or the layouts that match
            when more than one does.
    """
    root = Path(root)
    _check_root(root)
    found, tried = [], []
    for name, lay in LAYOUTS.items():
        base, why = lay.locate(root)
        if base is not None:
            found.append(name)
        else:
            tried.append(f"{name} [{lay.expected}]: {why}")
    if len(found) > 1:
        raise ConfigError(f"{root} matches several dataset layouts ({', '.join(found)}); name one: NAME:{root}")
    if not found:
        raise ConfigError(f"{root} matches no known dataset layout (it holds {_show(root)}); tried " + "; ".join(tried))
    return found[0]


def open_dataset(name: str | None, root: str | Path, split: str | None = None) -> PairSource:
    """Open a public dataset in its published layout: list its pairs (paths only) for lazy reading.

    Args:
        name: registry name (see :data:`LAYOUTS`; aliases accepted), or None / ``"auto"`` to detect it.
        root: the dataset's folder (as downloaded and extracted).
        split: ``"all"``, a split or season name, or several joined by commas (default: the dataset's
            ``default_split``: ``train`` where the dataset has one, else ``all``).

    Raises:
        ConfigError: unknown name, a root that is not in the dataset's layout, an unknown or empty split.
    """
    root = Path(root)
    if name is None or name.lower() == "auto":
        name = detect_dataset(root)
    key = canonical_name(name)
    if key is None:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    lay = LAYOUTS[key]
    _check_root(root)
    base, why = lay.locate(root)
    if base is None:
        raise ConfigError(
            f"{root} is not a {lay.title} folder: expected {lay.expected}; {why} (it holds {_show(root)})"
        )
    split = split or lay.default_split
    listing = Listing()
    for part in split.split(","):
        listing.add(lay.list_split(base, part.strip()))
    if listing.unpaired:
        logger.warning(
            "%s %s: skipped %d file(s) without a partner (e.g. %s)", key, root, listing.unpaired, listing.example
        )
    if not listing.pairs:
        raise ConfigError(
            f"{key} {root}: split {split!r} holds no SAR-optical pairs"
            + (f" ({listing.unpaired} unpaired files, e.g. {listing.example})" if listing.unpaired else "")
            + f"; expected {lay.expected}"
        )
    return PairSource(lay, root, base, split, listing)


def open_spec(spec: str | DatasetSpec) -> PairSource:
    """Open a ``--dataset`` value (:func:`parse_dataset_spec`)."""
    s = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    return open_dataset(s.name, s.root, s.split)
