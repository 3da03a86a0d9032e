"""Calibration sets for INT8 quantisation (torch-free): prepared SAR windows and optical tiles from scenes.

A calibration set is a folder, versioned like any artefact::

    CALIB/sar.npy           (N, C, H, W) float32 SAR windows, prepared (sarloc.core.preprocess)
    CALIB/optical.npy       (N, C, H, W) float32 optical tiles, prepared
    CALIB/scene_index.npy   (N,) int32: which scene each row comes from (same layout for both modalities)
    CALIB/manifest.json     scenes (name, path, image sha256), n_per_scene, window_px, preprocessing, seed,
                            file sha256s and the set's own sha256 (its identity in INT8 manifests)

Windows are drawn uniformly at random inside each scene, ``n_per_scene`` per scene and modality (stratified:
every scene weighs the same whatever its size). The data source follows Polygraphy's contract: a generator
of ``{input_name: ndarray}`` feeds (:func:`calibration_feed`). A set whose files, shape, preprocessing or
source scenes no longer match is *stale* (:func:`calibration_problems`); callers warn and rebuild it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.backends.layout import MODALITIES
from sarloc.core.artifacts import (
    atomic_save,
    atomic_write_json,
    load_npy,
    make_manifest,
    read_json,
    sha256_bytes,
    sha256_file,
)
from sarloc.core.errors import ArtifactError, ConfigError, SceneError
from sarloc.core.preprocess import PreprocessConfig, crop_windows, prepare_windows

logger = logging.getLogger(__name__)

CALIB_KIND = "sarloc.calibration-set"
CALIB_FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "scene_index.npy"
DEFAULT_N_PER_SCENE = 32


def scene_fingerprint(scene_dir: str | Path) -> dict[str, str]:
    """Identity of a scene's content: name, resolved path and the sha256 of its optical and SAR image files.

    The hashes are computed from the files (not copied from ``scene.json``), so a replaced image is noticed.
    """
    scene_dir = Path(scene_dir)
    meta = read_json(scene_dir / "scene.json", "scene")
    fp = {"name": str(meta.get("name") or scene_dir.name), "path": str(scene_dir.resolve())}
    for m in MODALITIES:
        entry = meta.get(m)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise SceneError(f"{scene_dir / 'scene.json'}: field '{m}.file' is missing")
        f = scene_dir / entry["file"]
        if not f.is_file():
            raise SceneError(f"{m} image {f} not found")
        fp[f"{m}_sha256"] = sha256_file(f)
    return fp


def _save_npy(path: Path, arr: np.ndarray) -> str:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_save(path, write)
    return sha256_file(path)


def build_calibration_set(
    scene_dirs: Sequence[str | Path],
    out_path: str | Path,
    n_per_scene: int = DEFAULT_N_PER_SCENE,
    window_px: int = 64,
    prep: PreprocessConfig = PreprocessConfig(),
    seed: int = 0,
) -> Path:
    """Draw a stratified calibration set from scenes and write it (see the module docstring for the layout).

    Args:
        scene_dirs: scene folders, or folders of scene folders.
        out_path: the calibration folder (created; an existing set is replaced).
        n_per_scene: windows per scene and modality.
        window_px: window side (the model's input H = W).
        prep: preprocessing (the model's, from its manifest).
        seed: random seed; scene ``i`` draws from ``default_rng([seed, i])``.

    Returns:
        ``out_path``.

    Raises:
        SceneError: a scene is missing, unreadable or smaller than the window.
        ConfigError: ``n_per_scene`` < 1.
    """
    from sarloc.core.scene import find_scenes, load_scene

    if n_per_scene < 1:
        raise ConfigError(f"n_per_scene must be >= 1, got {n_per_scene}")
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a set interrupted mid-rebuild must read as stale
    dirs = find_scenes([Path(d) for d in scene_dirs])
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    index, scenes = [], []
    for i, d in enumerate(dirs):
        scene = load_scene(d)
        h, w = scene.height_px, scene.width_px
        if window_px > min(h, w):
            raise SceneError(f"{d}: window of {window_px} px is larger than the scene ({w}x{h} px)")
        rng = np.random.default_rng([seed, i])
        for m, img in (("sar", scene.sar_gray), ("optical", scene.optical_gray)):
            origins = np.stack(
                [rng.integers(0, w - window_px + 1, n_per_scene), rng.integers(0, h - window_px + 1, n_per_scene)],
                axis=1,
            )
            arrays[m].append(prepare_windows(crop_windows(img, origins, window_px), prep))
        index.append(np.full(n_per_scene, i, np.int32))
        scenes.append({**scene_fingerprint(d), "count": n_per_scene})
    files = {f"{m}.npy": _save_npy(out / f"{m}.npy", np.concatenate(arrays[m])) for m in MODALITIES}
    files[INDEX_FILE] = _save_npy(out / INDEX_FILE, np.concatenate(index))
    c = prep.channels
    man = make_manifest(
        CALIB_KIND,
        parent_sha256=sha256_bytes(
            "\n".join(sorted(f"{s['name']}:{s['optical_sha256']}:{s['sar_sha256']}" for s in scenes)).encode()
        ),
        format=CALIB_FORMAT,
        sha256=_set_digest(files),
        files=files,
        n=int(n_per_scene * len(scenes)),
        n_per_scene=int(n_per_scene),
        shape=[c, window_px, window_px],
        dtype="float32",
        window_px=int(window_px),
        preprocess=prep.to_dict(),
        seed=int(seed),
        sampling="uniform random window origins, n_per_scene per scene and modality, independent per modality",
        scenes=scenes,
    )
    atomic_write_json(out / MANIFEST, man)
    logger.info("calibration set %s: %d scenes x %d windows per modality", out, len(scenes), n_per_scene)
    return out


def _set_digest(files: dict[str, str]) -> str:
    return sha256_bytes("\n".join(f"{k}:{v}" for k, v in sorted(files.items())).encode())


def read_calibration_manifest(calib_dir: str | Path) -> dict[str, Any]:
    """The manifest of a calibration set (ArtifactError when missing or malformed)."""
    where = Path(calib_dir) / MANIFEST
    man = read_json(where, "calibration set manifest")
    if man.get("kind") != CALIB_KIND:
        raise ArtifactError(f"{where} is not a calibration set manifest")

    def bad(field: str, want: str) -> ArtifactError:
        return ArtifactError(f"{where}: field {field!r} must be {want}; rebuild the set with `sarloc calib`")

    files, scenes = man.get("files"), man.get("scenes")
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise bad("files", "{file name: sha256 string}")
    if not (isinstance(scenes, list) and all(isinstance(sc, dict) for sc in scenes)):
        raise bad("scenes", "a list of objects")
    for sc in scenes:
        if not all(isinstance(sc.get(k), str) for k in ("name", "path", "optical_sha256", "sar_sha256")):
            raise bad("scenes", "objects with string name, path, optical_sha256 and sar_sha256")
    return man


def calibration_problems(
    calib_dir: str | Path,
    window_px: int,
    prep: PreprocessConfig,
    expect_sha256: str | None = None,
    check_scenes: bool = True,
) -> list[str]:
    """Why a calibration set cannot be used for a model (empty list: it can).

    Checks the manifest (present, same format), each file against its sha256, the arrays' shape and dtype
    against (C, window_px, window_px) float32, the preprocessing, an expected set hash (e.g. the one an INT8
    manifest recorded), and, when ``check_scenes``, that the source scenes still present have not changed.
    """
    calib_dir = Path(calib_dir)
    try:
        man = read_calibration_manifest(calib_dir)
    except ArtifactError as e:
        return [str(e)]
    problems = []
    if man.get("format") != CALIB_FORMAT:
        problems.append(f"format {man.get('format')!r:.40} != {CALIB_FORMAT}")
    files = man.get("files") or {}
    for name in [f"{m}.npy" for m in MODALITIES] + [INDEX_FILE]:
        p = calib_dir / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != files.get(name):
            problems.append(f"{name} does not match its sha256 (modified or truncated)")
    if problems:
        return problems
    if man.get("sha256") != _set_digest(files):
        problems.append("the set's sha256 does not match its files")
    want = [prep.channels, window_px, window_px]
    for m in MODALITIES:
        try:
            arr = load_npy(calib_dir / f"{m}.npy", "calibration set", "rebuild it with `sarloc calib`")
        except ArtifactError as e:
            problems.append(str(e))
            continue
        if arr.dtype != np.float32:
            problems.append(f"{m}.npy is {arr.dtype}, the model takes float32")
        if arr.ndim != 4 or list(arr.shape[1:]) != want:
            problems.append(f"{m}.npy windows are {tuple(arr.shape[1:])}, the model takes {tuple(want)}")
        if len(arr) == 0:
            problems.append(f"{m}.npy is empty")
    if man.get("preprocess") != prep.to_dict():
        problems.append(f"preprocessing {man.get('preprocess')!r:.200} differs from the model's {prep.to_dict()}")
    if expect_sha256 and man.get("sha256") != expect_sha256:
        problems.append(f"set sha256 {str(man.get('sha256'))[:12]!r} differs from the expected {expect_sha256[:12]}")
    if check_scenes:
        for s in man.get("scenes") or []:
            d = Path(s.get("path", ""))
            if not (d / "scene.json").is_file():
                logger.debug("calibration scene %s is not available here; not re-checked", d)
                continue
            try:
                now = scene_fingerprint(d)
            except (ArtifactError, SceneError) as e:
                problems.append(f"scene {s.get('name')!r:.60} is unreadable ({e})")
                continue
            if any(now[k] != s.get(k) for k in ("optical_sha256", "sar_sha256")):
                problems.append(f"scene {s.get('name')!r:.60} changed since the set was built")
    return problems


def ensure_calibration_set(
    scene_dirs: Sequence[str | Path],
    out_path: str | Path,
    n_per_scene: int = DEFAULT_N_PER_SCENE,
    window_px: int = 64,
    prep: PreprocessConfig = PreprocessConfig(),
    seed: int = 0,
) -> Path:
    """Reuse the calibration set at ``out_path`` when it is valid and drawn the same way, else (re)build it.

    A set that exists but is stale, or was drawn from other scenes / counts / seed, is rebuilt with a warning.
    """
    from sarloc.core.scene import find_scenes

    out = Path(out_path)
    if not (out / MANIFEST).is_file():
        return build_calibration_set(scene_dirs, out, n_per_scene, window_px, prep, seed)
    problems = calibration_problems(out, window_px, prep)
    if not problems:
        man = read_calibration_manifest(out)
        want_paths = sorted(str(Path(d).resolve()) for d in find_scenes([Path(d) for d in scene_dirs]))
        have_paths = sorted(s["path"] for s in man.get("scenes", []))
        if want_paths != have_paths:
            problems.append("it was drawn from other scenes")
        if man.get("n_per_scene") != n_per_scene or man.get("seed") != seed:
            drawn = f"n_per_scene={man.get('n_per_scene')!r:.20}, seed={man.get('seed')!r:.20}"
            problems.append(f"it was drawn with {drawn}")
    if not problems:
        logger.info("reusing calibration set %s", out)
        return out
    logger.warning("calibration set %s is stale (%s); rebuilding it", out, "; ".join(problems))
    return build_calibration_set(scene_dirs, out, n_per_scene, window_px, prep, seed)


def calibration_feed(
    calib_dir: str | Path,
    modality: str,
    input_name: str = "windows",
    batch_size: int = 16,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Polygraphy-style data source: yields ``{input_name: (b, C, H, W) float32}`` batches of one modality.

    Args:
        calib_dir: calibration folder.
        modality: "sar" or "optical" (the model being calibrated).
        input_name: the model's input name.
        batch_size: rows per feed.
        indices: rows to use (default all), e.g. a calibration split leaving a hold-out aside.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
    arr = load_npy(Path(calib_dir) / f"{modality}.npy", "calibration set", "rebuild it with `sarloc calib`")
    idx = np.arange(len(arr)) if indices is None else np.asarray(indices, np.int64)
    for i in range(0, len(idx), batch_size):
        yield {input_name: np.ascontiguousarray(arr[idx[i : i + batch_size]])}
