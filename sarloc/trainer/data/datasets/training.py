"""Training on public datasets, alone or mixed with scene folders (torch-free).

Each drawn pair becomes a small in-memory :class:`~sarloc.core.scene.Scene` (its metric frame = pixels x GSD) and
:class:`~sarloc.trainer.data.pairs.PairSampler` cuts its windows exactly as it does from scene folders, so the
augmentation, soft targets and preprocessing are the same. :class:`MixedSampler` splits each batch's
``scenes_per_batch`` slots between the sources (the scene folders together are one source, each dataset one),
draws one pair of this rank's shard per dataset slot and keeps recently read pairs in a byte-bounded LRU cache.
Every draw comes from the one generator ``rng``, so a resumed run (which restores it) draws the same batches.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import ConfigError, SceneError
from sarloc.core.geo import GeoFrame
from sarloc.core.preprocess import PreprocessConfig
from sarloc.core.scene import Scene
from sarloc.trainer.data.datasets.base import PairSource
from sarloc.trainer.data.datasets.registry import DatasetSpec, open_spec
from sarloc.trainer.data.pairs import AugmentConfig, PairBatch, PairSampler

logger = logging.getLogger(__name__)


class _SceneCache:
    """Least-recently-used pair scenes, bounded by their arrays' bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._d: OrderedDict[tuple[int, int], tuple[Scene, int]] = OrderedDict()

    def get(self, key: tuple[int, int]) -> Scene | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[int, int], scene: Scene) -> None:
        size = scene.sar.nbytes + scene.optical.nbytes + scene.sar_gray.nbytes + scene.optical_gray.nbytes
        self._d[key] = (scene, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._d) > 1:
            _, (_, old) = self._d.popitem(last=False)
            self.bytes -= old


def _concat(parts: list[PairBatch]) -> PairBatch:
    """One batch of several: images stacked, targets and masks block-diagonal (no positives across parts)."""
    if len(parts) == 1:
        return parts[0]
    n = sum(len(p.sar) for p in parts)
    targets = np.zeros((n, n), np.float32)
    pos, semi = np.zeros((n, n), bool), np.zeros((n, n), bool)
    idx, o, off = [], 0, 0
    for p in parts:
        k = len(p.sar)
        targets[o : o + k, o : o + k] = p.targets
        pos[o : o + k, o : o + k] = p.pos_mask
        semi[o : o + k, o : o + k] = p.semi_mask
        idx.append(p.scene_idx + off)
        off += int(p.scene_idx.max()) + 1
        o += k
    return PairBatch(
        sar=np.concatenate([p.sar for p in parts]),
        optical=np.concatenate([p.optical for p in parts]),
        targets=targets,
        pos_mask=pos,
        semi_mask=semi,
        scene_idx=np.concatenate(idx),
        centres=np.concatenate([p.centres for p in parts]),
        opt_centres=np.concatenate([p.opt_centres for p in parts if p.opt_centres is not None]),
    )


class MixedSampler:
    """Batches of (SAR window, optical patch) pairs from scene folders and public datasets.

    Args:
        scene_sampler: a :class:`PairSampler` over the scene folders (None: datasets only); it draws from this
            sampler's generator.
        sources: the opened datasets; ``shards``: the pair indices of each that this rank draws from.
        window_px, batch_size, prep, aug, scenes_per_batch, semi_weight: as :class:`PairSampler`'s.
        seed: seed of the generator ``rng`` (every draw comes from it).
        cache_mb: memory for recently read pairs.
    """

    def __init__(
        self,
        scene_sampler: PairSampler | None,
        sources: list[PairSource],
        shards: list[np.ndarray],
        window_px: int,
        batch_size: int,
        prep: PreprocessConfig,
        aug: AugmentConfig = AugmentConfig(),
        scenes_per_batch: int = 4,
        seed: int = 0,
        semi_weight: float = 0.5,
        cache_mb: float = 256.0,
    ) -> None:
        if not sources:
            raise ConfigError("MixedSampler needs at least one dataset; use PairSampler for scene folders alone")
        self.rng = np.random.default_rng(seed)
        self.scene_sampler = scene_sampler
        if scene_sampler is not None:
            scene_sampler.rng = self.rng
        self.sources, self.shards = sources, shards
        self.window_px, self.batch_size, self.prep, self.aug = window_px, batch_size, prep, aug
        self.scenes_per_batch = max(1, min(scenes_per_batch, batch_size))
        self.semi_weight = semi_weight
        self._cache = _SceneCache(int(cache_mb * 2**20))
        self._bad: set[tuple[int, int]] = set()

    def _pair_scene(self, d: int) -> Scene:
        """A random readable pair of dataset ``d`` (this rank's shard) as a scene; unreadable or too small pairs
        are skipped with a warning (each once) and another is drawn."""
        src, shard = self.sources[d], self.shards[d]
        for _ in range(50):
            key = (d, int(shard[self.rng.integers(len(shard))]))
            if key in self._bad:
                continue
            scene = self._cache.get(key)
            if scene is None:
                try:
                    scene = src.scene(key[1])
                except SceneError as e:
                    logger.warning("%s: skipping an unreadable pair: %s", src.name, e)
                    self._bad.add(key)
                    continue
                if min(scene.width_px, scene.height_px) < self.window_px:
                    logger.warning(
                        "%s: skipping %s: %dx%d px is smaller than the %d-px window",
                        src.name,
                        src.pairs[key[1]][0],
                        scene.width_px,
                        scene.height_px,
                        self.window_px,
                    )
                    self._bad.add(key)
                    continue
                self._cache.put(key, scene)
            return scene
        raise ConfigError(f"{src.name} {src.root}: 50 draws in a row found no usable pair; check the files")

    def _from_scenes(self, n_pairs: int, n_slots: int) -> PairBatch:
        """``n_pairs`` pairs from the scene folders over ``n_slots`` scenes (the scene sampler's own draw)."""
        s = self.scene_sampler
        assert s is not None
        saved = s.batch_size, s.scenes_per_batch
        s.batch_size, s.scenes_per_batch = n_pairs, max(1, min(n_slots, len(s.scenes), n_pairs))
        try:
            return s.sample()
        finally:
            s.batch_size, s.scenes_per_batch = saved

    def sample(self) -> PairBatch:
        """Draw one batch."""
        k, b = self.scenes_per_batch, self.batch_size
        per = np.full(k, b // k)
        per[: b % k] += 1
        has_scenes = self.scene_sampler is not None
        slots = self.rng.integers(len(self.sources) + has_scenes, size=k)
        parts = []
        if has_scenes and (slots == 0).any():
            parts.append(self._from_scenes(int(per[slots == 0].sum()), int((slots == 0).sum())))
        ds = slots - has_scenes
        if (ds >= 0).any():
            patches = [self._pair_scene(int(d)) for d in ds[ds >= 0]]
            ps = PairSampler(
                patches,
                self.window_px,
                int(per[ds >= 0].sum()),
                self.prep,
                self.aug,
                len(patches),
                seed=0,
                semi_weight=self.semi_weight,
            )
            ps.rng = self.rng
            parts.append(ps.sample())
        return _concat(parts)


def dataset_marker(source: PairSource, info: dict[str, Any]) -> Scene:
    """A pixel-less stand-in :class:`Scene` that names a dataset among a run's scenes: ``config.json``, the log,
    the resume check and the checkpoint's parent digest (its ``sha256`` is the listing's digest) then cover it."""
    z3, z2 = np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.float32)
    return Scene(
        name=f"{source.name}:{source.root} [{source.split}, {len(source)} pairs]",
        path=Path(source.root),
        optical=z3,
        sar=z3,
        optical_gray=z2,
        sar_gray=z2,
        change_mask=None,
        frame=GeoFrame(1, 1),
        meta={"dataset": info, "optical": {"sha256": info["sha256"]}, "sar": {"sha256": info["sha256"]}},
    )


def _first_readable(src: PairSource, shard: np.ndarray, tries: int = 5) -> Scene:
    """The first of ``tries`` pairs of ``shard`` that reads (the last error when none does)."""
    for k in range(min(tries, len(shard))):
        try:
            return src.scene(int(shard[k]))
        except SceneError:
            if k == min(tries, len(shard)) - 1:
                raise
    raise AssertionError("unreachable: a shard is never empty")


def training_data(
    scenes: list[Scene],
    datasets: list[str | DatasetSpec | PairSource],
    *,
    window_px: int,
    batch_size: int,
    prep: PreprocessConfig,
    aug: AugmentConfig,
    scenes_per_batch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[Scene], MixedSampler, list[dict[str, Any]]]:
    """Open the datasets and build the sampler of one training process.

    Every rank shards each dataset with the same ``seed`` (disjoint parts); the batches are drawn with
    ``seed * 1000 + rank``, as :class:`PairSampler`'s.

    Returns:
        (``scenes`` + one :func:`dataset_marker` per dataset, the sampler, each dataset's
        :meth:`PairSource.describe`).

    Raises:
        ConfigError: a dataset cannot be opened, has fewer pairs than processes, or its pairs are smaller than
            the window.
    """
    sources = [d if isinstance(d, PairSource) else open_spec(d) for d in datasets]
    shards = [src.shard(rank, world, seed) for src in sources]
    for src, shard in zip(sources, shards, strict=True):
        first = _first_readable(src, shard)  # reads early: a wrong band count or format fails before training
        if min(first.width_px, first.height_px) < window_px:
            raise ConfigError(
                f"{src.name} {src.root}: pairs are {first.width_px}x{first.height_px} px, smaller than the "
                f"{window_px}-px window; use --window-px {min(first.width_px, first.height_px)} or less"
            )
    sub = seed * 1000 + rank
    static = PairSampler(scenes, window_px, batch_size, prep, aug, scenes_per_batch, seed=sub) if scenes else None
    sampler = MixedSampler(static, sources, shards, window_px, batch_size, prep, aug, scenes_per_batch, seed=sub)
    infos = [src.describe() for src in sources]
    for info in infos:
        logger.info(
            "dataset %s %s: split %s, %d pairs%s",
            info["name"],
            info["root"],
            info["split"],
            info["pairs"],
            f" ({info['unpaired']} unpaired files skipped)" if info["unpaired"] else "",
        )
    return [*scenes, *(dataset_marker(s, i) for s, i in zip(sources, infos, strict=True))], sampler, infos
