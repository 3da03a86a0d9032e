"""8-bit SAR-optical matching / translation datasets: QXS-SAROPT, OSdataset and SAR2Opt (PNG / JPG pairs).

QXS-SAROPT (Huang et al. 2021, arXiv:2103.08259; github.com/yaoxu008/QXS-SAROPT): 20,000 pairs of 256 x 256 px,
GaoFen-3 spotlight SAR and Google Earth optical, 1 m::

    ROOT/sar_256_oc_0.2/<n>.png     SAR, 8-bit grey
    ROOT/opt_256_oc_0.2/<n>.png     optical, 8-bit RGB         pair rule: same file name

ROOT may also be the folder holding ``QXSLAB_SAROPT/``; copies re-split into ``train/`` and ``test/`` (each holding
both folders) are accepted as splits. The archive has no official split (``all``).

OSdataset (Xiang et al. 2020, IEEE JSTARS 13:5847, "Automatic registration of optical and SAR images via improved
phase congruency model"; github.com/xym2009/OSdataset): GaoFen-3 SAR and Google Earth optical at 1 m,
2,673 pairs of 512 x 512 px and 10,692 of 256 x 256 px; SAR is linear amplitude stretched to 8 bits (MATLAB
``imadjust``)::

    ROOT/[256|512/]train/sar<n>.png + opt<n>.png               pair rule: same number <n>, same folder
    ROOT/[256|512/]test/...

(the folder and file names follow the loaders built on it, e.g. the OS patch dataset of YuChuang1205, whose lists
name the folders ``train`` / ``test``). A root holding both ``256/`` and ``512/`` is refused (the 256 px patches
are cut from the 512 px ones): give one of them.

SAR2Opt (Zhao et al. 2022; github.com/MarsZhaoYT/SAR2Opt-Heterogeneous-Dataset): 600 x 600 px pairs, registered by
hand, in the CycleGAN folder layout (A = SAR, B = optical)::

    ROOT/trainA/<name>.jpg + trainB/<name>.jpg                 pair rule: same file name, A <-> B
    ROOT/testA/... + testB/...

Its ground sample distance is not published per patch; 1 m is assumed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sarloc.core.errors import ConfigError
from sarloc.core.scene import normalise_optical, normalise_sar
from sarloc.trainer.data.datasets.base import Layout, Listing, PairSample, fit_optical, image_stems, pair_folders
from sarloc.trainer.data.datasets.base import subdirs as _subdirs
from sarloc.trainer.data.datasets.raster import grey, read_raster

_SPLIT = r"train|test|val|validation|trainval"


def _read_8bit(layout: Layout, base: Path, sar_rel: str, opt_rel: str, sar_scale: str) -> PairSample:
    """An 8-bit pair: SAR grey (``display8``, or ``amplitude8`` = linear amplitude -> dB), optical display8."""
    sp, op = base / sar_rel, base / opt_rel
    sar_raw, _ = read_raster(sp, f"{layout.title.split(' (')[0]} SAR")
    opt_raw, _ = read_raster(op, f"{layout.title.split(' (')[0]} optical")
    sar8 = grey(sar_raw)
    if sar_scale == "amplitude8":  # power = amplitude^2, floored at one grey level
        power = (np.maximum(sar8.astype(np.float32), 1.0) / 255.0) ** 2
        sar = normalise_sar(power, "linear_0_1", what=str(sp))
    else:
        sar = normalise_sar(sar8, sar_scale, what=str(sp))
    optical = normalise_optical(opt_raw[..., :3] if opt_raw.shape[2] >= 3 else opt_raw, "display8", what=str(op))
    return PairSample(sar_rel, sar, fit_optical(optical, sar.shape[:2]), None, layout.gsd_m, {})


class QxsSaropt(Layout):
    """QXS-SAROPT: ``sar_256_oc_0.2/`` + ``opt_256_oc_0.2/``, paired by file name."""

    name = "qxs-saropt"
    title = "QXS-SAROPT (Huang et al. 2021, github.com/yaoxu008/QXS-SAROPT)"
    expected = "[QXSLAB_SAROPT/][<split>/]sar_256_oc_0.2/<n>.png + opt_256_oc_0.2/<n>.png"
    gsd_m = 1.0

    @staticmethod
    def _pair_dirs(folder: Path) -> list[tuple[str, str]]:
        """(SAR, optical) folder names directly in ``folder``: ``sar_<px>_oc_<r>`` with ``opt_<px>_oc_<r>``."""
        opt = set(_subdirs(folder, r"opt_\d+_oc_[\d.]+"))
        return [(s, "opt" + s[3:]) for s in _subdirs(folder, r"sar_\d+_oc_[\d.]+") if "opt" + s[3:] in opt]

    def _groups(self, base: Path) -> dict[str, list[tuple[str, str]]]:
        """``{split: [(SAR folder, optical folder) relative to base]}``; pairs at the top are split ``all``."""
        out = {"all": self._pair_dirs(base)} if self._pair_dirs(base) else {}
        for sp in _subdirs(base, _SPLIT):
            found = self._pair_dirs(base / sp)
            if found:
                out[sp] = [(f"{sp}/{s}", f"{sp}/{o}") for s, o in found]
        return out

    def locate(self, root: Path) -> tuple[Path | None, str]:
        for c in (root, root / "QXSLAB_SAROPT"):
            if self._groups(c):
                return c, ""
        return None, "no sar_256_oc_0.2/ + opt_256_oc_0.2/ folders"

    def splits(self, base: Path) -> list[str]:
        return [s for s in self._groups(base) if s != "all"]

    def list_split(self, base: Path, split: str) -> Listing:
        groups = self._groups(base)
        if split != "all" and split not in groups:
            raise ConfigError(f"{self.name} {base}: no split {split!r}; present: {', '.join(groups) or 'none'}")
        out = Listing()
        for name, dirs in groups.items():
            if split in ("all", name):
                for s, o in dirs:
                    out.add(pair_folders(base, s, o, lambda stem: stem))
        return out

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        return _read_8bit(self, base, sar_rel, opt_rel, "display8")


_OS_FILE = re.compile(r"(sar|opt)(\d+)")


class OsDataset(Layout):
    """OSdataset: ``[256|512/]<split>/sar<n>.png`` + ``opt<n>.png``."""

    name = "osdataset"
    title = "OSdataset (Xiang et al. 2020, github.com/xym2009/OSdataset)"
    expected = "[256|512/]train|test/sar<n>.png + opt<n>.png"
    gsd_m = 1.0
    default_split = "train"

    @staticmethod
    def _split_dirs(folder: Path) -> list[str]:
        return [d for d in _subdirs(folder, _SPLIT) if any(_OS_FILE.fullmatch(s) for s in image_stems(folder / d))]

    def locate(self, root: Path) -> tuple[Path | None, str]:
        for c in (root, root / "OSdataset"):
            if self._split_dirs(c):
                return c, ""
            sizes = [s for s in _subdirs(c, r"\d+") if self._split_dirs(c / s)]
            if len(sizes) > 1:
                raise ConfigError(
                    f"osdataset {c}: holds {' and '.join(s + '/' for s in sizes)} (the smaller patches are cut from "
                    f"the larger ones); give one of them, e.g. {c / sizes[-1]}"
                )
            if sizes:
                return c / sizes[0], ""
        return None, "no train/ or test/ folder of sar<n>.png + opt<n>.png"

    def splits(self, base: Path) -> list[str]:
        return self._split_dirs(base)

    def list_split(self, base: Path, split: str) -> Listing:
        present = self._split_dirs(base)
        chosen = present if split == "all" else [s for s in present if s == split]
        if not chosen:
            raise ConfigError(f"{self.name} {base}: no split {split!r}; present: {', '.join(present) or 'none'}")
        out = Listing()
        for sp in chosen:  # SAR and optical files share the folder
            stems = image_stems(base / sp)
            ids: dict[str, dict[str, str]] = {"sar": {}, "opt": {}}
            for stem, fname in stems.items():
                m = _OS_FILE.fullmatch(stem)
                if m:
                    ids[m[1]][m[2]] = fname
            for n in sorted(ids["sar"], key=int):
                if n in ids["opt"]:
                    out.pairs.append((f"{sp}/{ids['sar'][n]}", f"{sp}/{ids['opt'][n]}"))
            lone = sorted((set(ids["sar"]) ^ set(ids["opt"])), key=int)
            out.unpaired += len(lone)
            if lone and not out.example:
                n = lone[0]
                out.example = f"{sp}/{ids['sar'].get(n) or ids['opt'][n]}"
        return out

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        return _read_8bit(self, base, sar_rel, opt_rel, "amplitude8")


class Sar2Opt(Layout):
    """SAR2Opt: CycleGAN layout ``trainA/`` (SAR) + ``trainB/`` (optical), ``testA/`` + ``testB/``."""

    name = "sar2opt"
    title = "SAR2Opt (Zhao et al. 2022, github.com/MarsZhaoYT/SAR2Opt-Heterogeneous-Dataset)"
    expected = "trainA/<name>.jpg + trainB/<name>.jpg (and testA/ + testB/)"
    gsd_m = 1.0
    default_split = "train"

    def _present(self, base: Path) -> list[str]:
        names = set(_subdirs(base, r"(train|test|val)[AB]"))
        return [s for s in ("train", "test", "val") if {s + "A", s + "B"} <= names]

    def locate(self, root: Path) -> tuple[Path | None, str]:
        for c in (root, root / "SAR2Opt"):
            if self._present(c):
                return c, ""
        return None, "no trainA/ + trainB/ (or testA/ + testB/) folders"

    def splits(self, base: Path) -> list[str]:
        return self._present(base)

    def list_split(self, base: Path, split: str) -> Listing:
        present = self._present(base)
        chosen = present if split == "all" else [s for s in present if s == split]
        if not chosen:
            raise ConfigError(f"{self.name} {base}: no split {split!r}; present: {', '.join(present) or 'none'}")
        out = Listing()
        for sp in chosen:
            out.add(pair_folders(base, sp + "A", sp + "B", lambda stem: stem))
        return out

    def read(self, base: Path, sar_rel: str, opt_rel: str) -> PairSample:
        return _read_8bit(self, base, sar_rel, opt_rel, "display8")
