"""SpaceNet 6 (MSAW, Shermeyer et al. 2020, arXiv:2004.06500; spacenet.ai/sn6-challenge): Capella aerial SAR and
Maxar WorldView-2 pan-sharpened RGB over Rotterdam, 900 x 900 px tiles at 0.5 m, both GeoTIFF in UTM 31N::

    ROOT/AOI_11_Rotterdam/SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<t0>_<t1>_tile_<n>.tif
        4 bands HH, HV, VH, VV: float32 intensity in dB (10 log10, negative values set to 0)
    ROOT/AOI_11_Rotterdam/PS-RGB/SN6_Train_AOI_11_Rotterdam_PS-RGB_<t0>_<t1>_tile_<n>.tif
        3 bands R, G, B: uint8

Pair rule (as the challenge's baseline, CosmiQ_SN6_Baseline, and its loaders): the optical file is the SAR file
name with ``SAR-Intensity`` replaced by ``PS-RGB``, in the sibling ``PS-RGB/`` folder. ROOT may be the AOI folder
itself, the folder holding it, or the challenge's ``train/`` parent of it. The public test set ships SAR only,
so only the training tiles pair up (split ``train``). Tiles partly outside the SAR swath hold 0 in every band
(no data); those pixels become the scene's change mask, so training windows mostly over them are redrawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import ConfigError
from sarloc.core.scene import normalise_optical, normalise_sar
from sarloc.trainer.data.datasets.base import Layout, Listing, PairSample, fit_optical, gsd_of, pair_folders, subdirs
from sarloc.trainer.data.datasets.raster import read_raster

_SAR, _RGB = "SAR-Intensity", "PS-RGB"


def _partner(stem: str) -> str | None:
    return stem.replace(f"_{_SAR}_", f"_{_RGB}_", 1) if f"_{_SAR}_" in stem else None


class SpaceNet6(Layout):
    """SpaceNet 6: ``SAR-Intensity/`` (4 x float32 dB) + ``PS-RGB/`` (3 x uint8) GeoTIFF tiles."""

    name = "spacenet6"
    title = "SpaceNet 6 / MSAW (Shermeyer et al. 2020, arXiv:2004.06500)"
    expected = "[train/][AOI_<n>_<city>/]SAR-Intensity/SN6_*_SAR-Intensity_*.tif + PS-RGB/SN6_*_PS-RGB_*.tif"
    gsd_m = 0.5
    default_split = "train"

    @staticmethod
    def _is_aoi(folder: Path) -> bool:
        return {_SAR, _RGB} <= set(subdirs(folder, f"{_SAR}|{_RGB}"))

    def locate(self, root: Path) -> tuple[Path | None, str]:
        for c in (root, root / "train"):
            if self._is_aoi(c):
                return c, ""
            aois = [a for a in subdirs(c, r"AOI_.+") if self._is_aoi(c / a)]
            if len(aois) > 1:
                raise ConfigError(f"spacenet6 {c}: holds several AOIs ({', '.join(aois)}); give one of them")
            if aois:
                return c / aois[0], ""
        return None, f"no {_SAR}/ + {_RGB}/ folders"

    def splits(self, base: Path) -> list[str]:
        return ["train"]

    def list_split(self, base: Path, split: str) -> Listing:
        if split not in ("train", "all"):
            raise ConfigError(f"{self.name} {base}: no split {split!r}; only 'train' pairs SAR with optical")
        return pair_folders(base, _SAR, _RGB, _partner, (".tif", ".tiff"))

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        sp, op = base / sar_rel, base / opt_rel
        sar_raw, geo = read_raster(sp, "SpaceNet 6 SAR")
        opt_raw, _ = read_raster(op, "SpaceNet 6 optical")
        no_sar = ~np.any(sar_raw != 0, axis=2)
        optical = fit_optical(opt_raw[..., :3], sar_raw.shape[:2])
        no_opt = ~np.any(optical != 0, axis=2)
        sar = normalise_sar(sar_raw, "db", what=str(sp))
        optical = normalise_optical(optical, "display8", what=str(op))
        valid = ~(no_sar | no_opt)
        meta: dict[str, Any] = {k: geo[k] for k in ("crs", "geotransform") if k in geo}
        return PairSample(sar_rel, sar, optical, None if valid.all() else valid, gsd_of(geo, self.gsd_m), meta)
