"""SEN1-2 and SEN12MS: Sentinel-1 / Sentinel-2 patch pairs, 256 x 256 px at 10 m, in season folders.

SEN1-2 (Schmitt, Hughes, Zhu 2018, "The SEN1-2 dataset for deep learning in SAR-optical data fusion",
arXiv:1807.01569; mediaTUM 1436631)::

    ROOT/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p1.png    Sentinel-1 VV, 8-bit grey
    ROOT/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p1.png    Sentinel-2 RGB (bands 4, 3, 2), 8-bit

SEN12MS (Schmitt et al. 2019, ISPRS Annals IV-2/W7; loaders in github.com/schmitt-muc/SEN12MS)::

    ROOT/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif   2 bands VV, VH: float32 dB (GeoTIFF, UTM)
    ROOT/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif   13 bands B1..B12 incl. B8A: uint16 (GeoTIFF)

Seasons: ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter. The official loaders
(``sen12ms_dataLoader.py``, ``classification/dataset.py``) read the merged layout above (season folder holding
``s1_<n>``, ``s2_<n>``, ``lc_<n>``); the mediaTUM archives ``ROIs1158_spring_s1.tar.gz`` etc. extracted one by one
give ``ROOT/ROIs1158_spring_s1/s1_1/...`` next to ``ROOT/ROIs1158_spring_s2/s2_1/...`` (also the SEN12MS-CR
layout). Both variants are accepted, for both datasets; ``lc_*`` and ``s2_cloudy_*`` folders are ignored. The pair
rule is the loaders': the optical file is the SAR path with ``s1`` replaced by ``s2`` (folder and file name).
The two datasets share the naming and differ by format (PNG vs GeoTIFF), which is what detection looks at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sarloc.core.errors import ConfigError
from sarloc.core.scene import normalise_optical, normalise_sar
from sarloc.trainer.data.datasets.base import Layout, Listing, PairSample, fit_optical, gsd_of, pair_folders, subdirs
from sarloc.trainer.data.datasets.raster import grey, read_raster, take_bands

_SEASON = r"ROIs\d{4}_[A-Za-z]+"


def _partner(stem: str) -> str | None:
    """``ROIs1158_spring_s1_1_p30`` -> ``ROIs1158_spring_s2_1_p30``."""
    return stem.replace("_s1_", "_s2_", 1) if "_s1_" in stem else None


class _Sentinel(Layout):
    """The season-folder layout shared by SEN1-2 and SEN12MS; ``exts`` tells them apart."""

    exts: tuple[str, ...] = ()

    def _season_dirs(self, base: Path) -> dict[str, list[tuple[str, str]]]:
        """``{season: [(SAR folder, optical folder) relative to base, ...]}`` over both layout variants."""
        out: dict[str, list[tuple[str, str]]] = {}
        for s in subdirs(base, _SEASON):  # merged: ROIs1158_spring/s1_1 + s2_1
            for d in subdirs(base / s, r"s1_\d+"):
                out.setdefault(s, []).append((f"{s}/{d}", f"{s}/s2_{d[3:]}"))
        for s1 in subdirs(base, _SEASON + "_s1"):  # per archive: ROIs1158_spring_s1/s1_1 + ROIs1158_spring_s2/s2_1
            s = s1[:-3]
            for d in subdirs(base / s1, r"s1_\d+"):
                out.setdefault(s, []).append((f"{s1}/{d}", f"{s}_s2/s2_{d[3:]}"))
        return out

    def _holds_ours(self, folder: Path) -> bool | None:
        """Whether the first image file in ``folder`` has this dataset's format (None: no image in it)."""
        with os.scandir(folder) as it:
            for e in it:
                ext = os.path.splitext(e.name)[1].lower()
                if ext in (".png", ".jpg", ".tif", ".tiff"):
                    return ext in self.exts
        return None

    def locate(self, root: Path) -> tuple[Path | None, str]:
        seasons = self._season_dirs(root)
        want = f"{'/'.join(self.exts)} files in ROIs<nnnn>_<season>[_s1]/s1_<n>/"
        for folders in seasons.values():
            for sar, _ in folders:
                ours = self._holds_ours(root / sar)
                if ours is not None:
                    return (root, "") if ours else (None, f"{want} (found other files in {sar}/)")
        return None, f"no {want}" if not seasons else f"no image in the s1_<n>/ folders of {', '.join(seasons)}"

    def splits(self, base: Path) -> list[str]:
        return sorted({s.split("_", 1)[1] for s in self._season_dirs(base)})

    def list_split(self, base: Path, split: str) -> Listing:
        seasons = self._season_dirs(base)
        chosen = [s for s in seasons if split in ("all", s, s.split("_", 1)[1])]
        if not chosen:
            raise ConfigError(
                f"{self.name} {base}: no season {split!r}; present: {', '.join(self.splits(base)) or 'none'}"
            )
        out = Listing()
        for s in chosen:
            for sar, opt in seasons[s]:
                out.add(pair_folders(base, sar, opt, _partner, self.exts))
        return out


class Sen12(_Sentinel):
    """SEN1-2: 8-bit PNG pairs; SAR as display-scaled (pseudo-dB), optical RGB as display8."""

    name = "sen1-2"
    title = "SEN1-2 (Schmitt et al. 2018, arXiv:1807.01569)"
    expected = "ROIs<nnnn>_<season>/s1_<n>/*_s1_<n>_p<k>.png + s2_<n>/*_s2_<n>_p<k>.png"
    gsd_m = 10.0
    exts = (".png",)

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        sp, op = base / sar_rel, base / opt_rel
        sar_raw, _ = read_raster(sp, "SEN1-2 SAR")
        opt_raw, _ = read_raster(op, "SEN1-2 optical")
        # the VV dB values were clipped and stretched to 8 bits (the paper): a display-scaled log image
        sar = normalise_sar(grey(sar_raw), "display8", what=str(sp))
        optical = normalise_optical(opt_raw[..., :3], "display8", what=str(op))
        return PairSample(sar_rel, sar, fit_optical(optical, sar.shape[:2]), None, self.gsd_m, {})


class Sen12ms(_Sentinel):
    """SEN12MS: GeoTIFF pairs; SAR VV, VH in dB; optical = Sentinel-2 bands 4, 3, 2 (RGB), reflectance x 1e4."""

    name = "sen12ms"
    title = "SEN12MS (Schmitt et al. 2019, github.com/schmitt-muc/SEN12MS)"
    expected = (
        "ROIs<nnnn>_<season>/s1_<n>/*_s1_<n>_p<k>.tif + s2_<n>/*_s2_<n>_p<k>.tif "
        "(or ROIs<nnnn>_<season>_s1/s1_<n>/ + ROIs<nnnn>_<season>_s2/s2_<n>/)"
    )
    gsd_m = 10.0
    exts = (".tif", ".tiff")
    sar_bands = (1, 2)  # VV, VH
    rgb_bands = (4, 3, 2)  # B04 red, B03 green, B02 blue (the loaders' S2Bands.RGB)

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        sp, op = base / sar_rel, base / opt_rel
        sar_raw, geo = read_raster(sp, "SEN12MS SAR")
        opt_raw, _ = read_raster(op, "SEN12MS optical")
        sar = normalise_sar(take_bands(sar_raw, self.sar_bands, sp, "SEN12MS SAR"), "db", what=str(sp))
        rgb = take_bands(opt_raw, self.rgb_bands, op, "SEN12MS optical")
        optical = normalise_optical(rgb, "reflectance_1e4", what=str(op))
        meta: dict[str, Any] = {k: geo[k] for k in ("crs", "geotransform") if k in geo}
        return PairSample(sar_rel, sar, fit_optical(optical, sar.shape[:2]), None, gsd_of(geo, self.gsd_m), meta)
