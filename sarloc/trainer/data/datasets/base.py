"""What every public-dataset source shares: the layout interface, pair listing, lazy reading and streaming.

A :class:`Layout` knows one dataset's published folder layout: where its pairs are (``locate``), which splits it
has, how SAR and optical files pair up, and how to read and normalise one pair. A :class:`PairSource` is one
opened dataset (a root and a split): it lists its pairs once, as relative paths only (cheap for 10^5+ pairs),
reads a pair on demand (numpy, no torch) and streams random pairs sharded by rank.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import sha256_bytes
from sarloc.core.errors import ConfigError
from sarloc.core.geo import GeoFrame
from sarloc.core.scene import IMAGE_EXTS, Scene, to_single_band

logger = logging.getLogger(__name__)


@dataclass
class PairSample:
    """One read, normalised pair.

    Attributes:
        key: the pair's name within its dataset (the SAR file's path relative to the dataset folder).
        sar: (H, W, C) float32 on a log scale (dB or pseudo-dB, as :func:`sarloc.core.scene.normalise_sar`).
        optical: (H, W, C) float32 reflectance-like, about [0, 1] (:func:`sarloc.core.scene.normalise_optical`),
            on the SAR pixel grid.
        valid: (H, W) bool, False where either image holds no data (None: all valid).
        gsd_m: metres per pixel (the GeoTIFF's when projected, else the dataset's documented one).
        meta: dataset, files, and the GeoTIFF's ``crs`` / ``geotransform`` when it has them.
    """

    key: str
    sar: np.ndarray
    optical: np.ndarray
    valid: np.ndarray | None
    gsd_m: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_scene(self) -> Scene:
        """A small in-memory :class:`~sarloc.core.scene.Scene` of the pair: metric frame = pixels x ``gsd_m`` from
        the top-left corner; no-data pixels become its change mask (windows mostly over them are redrawn)."""
        h, w = self.sar.shape[:2]
        mask = None if self.valid is None or self.valid.all() else ~self.valid
        return Scene(
            name=f"{self.meta.get('dataset', 'dataset')}:{self.key}",
            path=Path(self.meta.get("sar_file", self.key)),
            optical=self.optical,
            sar=self.sar,
            optical_gray=to_single_band(self.optical, "optical"),
            sar_gray=to_single_band(self.sar, "sar"),
            change_mask=mask,
            frame=GeoFrame(w, h, gsd_m=(self.gsd_m, self.gsd_m)),
            meta=self.meta,
        )


@dataclass
class Listing:
    """The pairs of a split: (SAR, optical) paths relative to the dataset folder, and the files left unpaired."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    unpaired: int = 0
    example: str = ""

    def add(self, other: Listing) -> None:
        """Append ``other``'s pairs and unpaired count."""
        self.pairs.extend(other.pairs)
        self.unpaired += other.unpaired
        self.example = self.example or other.example


def image_stems(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> dict[str, str]:
    """``{stem: file name}`` of the image files directly in ``folder`` (one ``scandir``; empty when missing)."""
    out: dict[str, str] = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                stem, ext = os.path.splitext(e.name)
                if ext.lower() in exts and e.is_file():
                    out[stem] = e.name
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def pair_folders(
    base: Path, sar_rel: str, opt_rel: str, partner: Callable[[str], str | None], exts: tuple[str, ...] = IMAGE_EXTS
) -> Listing:
    """Pair the images of ``base/sar_rel`` with those of ``base/opt_rel``: SAR stem s goes with optical stem
    ``partner(s)``; a file of either side without its partner counts as unpaired."""
    sar = image_stems(base / sar_rel, exts)
    opt = image_stems(base / opt_rel, exts)
    out, used = Listing(), set()
    for stem in sorted(sar):
        o = partner(stem)
        if o is not None and o in opt:
            out.pairs.append((f"{sar_rel}/{sar[stem]}", f"{opt_rel}/{opt[o]}"))
            used.add(o)
        else:
            out.unpaired += 1
            out.example = out.example or f"{sar_rel}/{sar[stem]}"
    left = sorted(set(opt) - used)
    out.unpaired += len(left)
    if left and not out.example:
        out.example = f"{opt_rel}/{opt[left[0]]}"
    return out


def subdirs(folder: Path, pattern: str) -> list[str]:
    """Names of the sub-folders of ``folder`` that fully match the regular expression ``pattern``, sorted."""
    rx = re.compile(pattern)
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if rx.fullmatch(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


class Layout:
    """One dataset's published layout. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: registry name (``--dataset NAME:ROOT``).
        title: dataset and source (paper / repository) for messages and docs.
        expected: the layout in one line, for error messages.
        gsd_m: documented metres per pixel (used when a file has no projected geo-reference).
        default_split: the split opened when none is given.
    """

    name = ""
    title = ""
    expected = ""
    gsd_m = 1.0
    default_split = "all"

    def locate(self, root: Path) -> tuple[Path | None, str]:
        """(the dataset folder under ``root``, "") or (None, what is missing)."""
        raise NotImplementedError

    def splits(self, base: Path) -> list[str]:
        """The split names present in ``base``."""
        raise NotImplementedError

    def list_split(self, base: Path, split: str) -> Listing:
        """The pairs of one split."""
        raise NotImplementedError

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        """Read and normalise one pair (raises SceneError naming the file when it cannot)."""
        raise NotImplementedError


def fit_optical(optical: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The optical image resampled onto the SAR pixel grid when the two sizes differ (same footprint)."""
    if optical.shape[:2] == shape:
        return optical
    import cv2

    out = cv2.resize(optical, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return out if out.ndim == 3 else out[..., None]


def gsd_of(geo: dict[str, Any], default: float) -> float:
    """Metres per pixel from a GeoTIFF's projected pixel size (mean of x and y), else ``default``."""
    px = geo.get("pixel_m")
    if px and all(np.isfinite(px)) and min(px) > 0:
        return float((px[0] + px[1]) / 2.0)
    return default


class PairSource:
    """One opened dataset split: the listing of its pairs, lazy reading, sharding and streaming.

    Attributes:
        layout: the dataset's layout.
        root: the folder given; ``base``: the dataset folder found under it.
        split: the split opened (``all``, a split name, or several joined by commas).
        pairs: (SAR, optical) paths relative to ``base``, sorted per split.
        unpaired: files of the split left without a partner (skipped).
    """

    def __init__(self, layout: Layout, root: Path, base: Path, split: str, listing: Listing) -> None:
        self.layout, self.root, self.base, self.split = layout, root, base, split
        self.pairs = listing.pairs
        self.unpaired = listing.unpaired

    @property
    def name(self) -> str:
        """The dataset's registry name."""
        return self.layout.name

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"PairSource({self.name!r}, {str(self.root)!r}, split={self.split!r}, pairs={len(self)})"

    def paths(self, i: int) -> tuple[Path, Path]:
        """Absolute (SAR, optical) paths of pair ``i``."""
        s, o = self.pairs[i]
        return self.base / s, self.base / o

    def read(self, i: int) -> PairSample:
        """Read and normalise pair ``i`` (raises SceneError naming the file when it cannot be read)."""
        s, o = self.pairs[i]
        sample = self.layout.read(self.base, s, o)
        sample.meta.update(dataset=self.name, sar_file=str(self.base / s), optical_file=str(self.base / o))
        return sample

    def scene(self, i: int) -> Scene:
        """Pair ``i`` as a small in-memory scene (:meth:`PairSample.to_scene`)."""
        return self.read(i).to_scene()

    def shard(self, rank: int = 0, world: int = 1, seed: int = 0) -> np.ndarray:
        """The pair indices of ``rank`` out of ``world``: a seeded permutation of all pairs cut into ``world``
        disjoint parts (every rank computes the same permutation, so the parts never overlap).

        Raises:
            ConfigError: the split has fewer pairs than ranks.
        """
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} out of range for world size {world}")
        if len(self) < world:
            raise ConfigError(f"{self.name} {self.root}: {len(self)} pairs cannot be shared by {world} processes")
        return np.random.default_rng(seed).permutation(len(self))[rank::world]

    def stream(self, seed: int = 0, rank: int = 0, world: int = 1, epochs: int | None = None) -> Iterator[PairSample]:
        """Random pairs of this rank's shard, each epoch in a new order (deterministic given ``seed``); endless
        when ``epochs`` is None. For data-loader workers pass ``rank = rank * workers + worker`` and
        ``world = world * workers``."""
        mine = self.shard(rank, world, seed)
        e = 0
        while epochs is None or e < epochs:
            for i in np.random.default_rng([seed, rank, e]).permutation(mine):
                yield self.read(int(i))
            e += 1

    def digest(self) -> str:
        """sha256 over the dataset name, split and listed pair paths (changes when the pairs change)."""
        head = f"{self.name}\n{self.split}\n"
        return sha256_bytes((head + "\n".join(f"{s}\t{o}" for s, o in self.pairs)).encode())

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: name, root, split, pairs, unpaired, sha256."""
        return {
            "name": self.name,
            "root": str(self.root),
            "split": self.split,
            "pairs": len(self),
            "unpaired": self.unpaired,
            "sha256": self.digest(),
        }
