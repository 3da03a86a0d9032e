"""Property-based fuzzing of the artefact, config and record loaders that ``test_fuzz_parsers_*.py`` did not reach.

Same rule and machinery as ``tests/test_fuzz_parsers_*.py`` (the strategies, ``outcome`` and case counters of
``fuzz_common.py`` are shared, so their last test prints and checks these parsers too): a bad input gives a one-line
SarlocError, a refusal the loader documents (a list of problems, an empty timing cache), or a value the caller can
use; never another exception. Parsers here:

* training configs: ``TrainConfig.from_dict`` (``--config`` JSON, checkpoints) and ``sarloc.cli.common.read_config``;
* TensorRT engine manifests: ``read_engine_manifest`` + ``check_engine_manifest`` (no TensorRT needed), and the
  timing-cache manifest (``_load_timing_cache``);
* calibration sets: ``read_calibration_manifest`` / ``calibration_problems`` on a damaged manifest or ``.npy``;
* the daemon's records: ``load_fixes`` / ``score_fixes`` / ``load_truth`` (``sarloc report``), ``read_records`` /
  ``compare_fixes`` / ``session_config`` (``sarloc replay``) and ``done_strips`` (``resume``);
* ``read_checkpoint_sha256`` (a checkpoint's ``checkpoint.json`` as the export reads it);
* GeoTIFF basemaps: ``open_basemap`` + ``read`` (``sarloc map build``'s reader) on small, odd or damaged GeoTIFFs.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzz_common import (
    TINY_MAN,
    cut_or_flipped,
    fuzz,
    json_text_damage,
    json_value_huge,
    mutated,
    outcome,
    to_json_text,
    write,
)
from hypothesis import given
from hypothesis import strategies as st

from sarloc.core.artifacts import sha256_bytes
from sarloc.core.errors import SarlocError

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::PendingDeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_artifacts")


def _one_line_strings(items: Any) -> None:
    assert isinstance(items, list) and all(isinstance(s, str) and len(s.splitlines()) <= 1 for s in items), items


# ================================================================================================ 1. training config


def _base_config() -> dict[str, Any]:
    pytest.importorskip("torch")  # sarloc.trainer.config reads the encoder's config class (torch at import)
    from sarloc.trainer.config import resolve_config

    return resolve_config("smoke").to_dict()


def _check_config(cfg: Any) -> None:
    from sarloc.trainer.config import TrainConfig

    if isinstance(cfg, TrainConfig):  # accepted: usable, and it survives its own JSON round trip
        assert cfg.steps >= 1 and cfg.batch_size >= 2 and cfg.lr > 0 and cfg.encoder.in_channels >= 1
        assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@fuzz(1000)
@given(data=st.data())
def test_train_config_mutated(data):
    from sarloc.trainer.config import TrainConfig

    cfg = data.draw(mutated(_base_config(), 3))
    _check_config(outcome("training config: TrainConfig.from_dict", lambda: TrainConfig.from_dict(cfg)))


@fuzz(1000)
@given(data=st.data())
def test_train_config_json_file(work, data):
    from sarloc.cli.common import read_config
    from sarloc.trainer.config import TrainConfig

    base = _base_config()
    kind = data.draw(st.sampled_from(["damaged", "mutated", "value"]))
    if kind == "damaged":
        raw: bytes | str = data.draw(json_text_damage(json.dumps(base)))
    elif kind == "mutated":
        raw = to_json_text(data.draw(mutated(base, 3)))
    else:
        raw = to_json_text(data.draw(json_value_huge))
    p = write(work / "config.json", raw)
    _check_config(outcome("training config: --config JSON file", lambda: TrainConfig.from_dict(read_config(p))))


# ================================================================================================ 2. TensorRT files

ENGINE_BYTES = b"PLAN not a real engine"


def _engine_manifest() -> dict[str, Any]:
    from sarloc.backends.tensorrt import ENGINE_KIND

    man = {
        k: copy.deepcopy(TINY_MAN[k]) for k in ("modality", "input", "output", "embed_dim", "window_px", "preprocess")
    }
    man.update(
        schema=1,
        kind=ENGINE_KIND,
        parent_sha256=TINY_MAN["sha256"],
        file="m.engine",
        sha256=sha256_bytes(ENGINE_BYTES),
        onnx={"file": "m.onnx", "sha256": TINY_MAN["sha256"], "precision": "fp32"},
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="fp16",
        strongly_typed=False,
        builder_flags=["FP16"],
        profiles=[{"input": "windows", "min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}],
        batch_sizes=[1, 8, 32],
        timing_cache=None,
        checkpoint_sha256=TINY_MAN.get("checkpoint_sha256"),
    )
    return man


def _engine_case(work: Path, man_text: bytes | str, verify: bool) -> None:
    from sarloc.backends.layout import input_chw
    from sarloc.backends.tensorrt import GpuInfo, check_engine_manifest, read_engine_manifest

    d = work / "engine"
    d.mkdir(exist_ok=True)
    write(d / "m.engine", ENGINE_BYTES)
    write(d / "m.engine.json", man_text)

    def load() -> dict[str, Any]:
        man = read_engine_manifest(d / "m.engine", verify_sha256=verify)
        check_engine_manifest(man, "10.3.0", GpuInfo("Orin", "8.7"), allow_other_gpu_model=True)
        return man

    man = outcome("TensorRT engine manifest: read_engine_manifest + check_engine_manifest", load)
    if isinstance(man, dict):  # what TrtEncoder reads after these two checks
        c, h, w = input_chw(man)
        assert min(c, h, w) > 0 and int(man["profiles"][0]["max"][0]) > 0 and isinstance(man["output"]["name"], str)


@fuzz(1000)
@given(data=st.data(), verify=st.booleans())
def test_engine_manifest_mutated(work, data, verify):
    _engine_case(work, to_json_text(data.draw(mutated(_engine_manifest(), 4))), verify)


@fuzz(1000)
@given(data=st.data())
def test_engine_manifest_damaged_text(work, data):
    _engine_case(work, data.draw(json_text_damage(json.dumps(_engine_manifest()))), True)


def _timing_cache_manifest(data: bytes, key: str) -> dict[str, Any]:
    from sarloc.export.engine import TIMING_CACHE_KIND

    return {
        "schema": 1,
        "kind": TIMING_CACHE_KIND,
        "key": key,
        "sha256": sha256_bytes(data),
        "tensorrt_version": "10.3.0",
    }


@fuzz(1000)
@given(data=st.data(), cache=st.binary(max_size=64))
def test_timing_cache_manifest(work, data, cache):
    from sarloc.export.engine import _load_timing_cache

    d = work / "tcache"
    d.mkdir(exist_ok=True)
    p = write(d / "k.cache", cache)
    base = _timing_cache_manifest(cache, "KEY")
    raw = data.draw(st.one_of(mutated(base, 3).map(to_json_text), json_text_damage(json.dumps(base))))
    write(d / "k.json", raw)
    got = outcome("TensorRT timing cache: _load_timing_cache", lambda: _load_timing_cache(p, "KEY"))
    assert got in (b"", cache), "a timing cache is either used whole or not at all"


# ================================================================================================ 3. calibration set


@pytest.fixture(scope="module")
def calib_base(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    from sarloc.calib.dataset import build_calibration_set
    from sarloc.core.preprocess import PreprocessConfig
    from sarloc.sim.scenes import SynthConfig, write_scene

    root = tmp_path_factory.mktemp("calib")
    scene = write_scene(root / "scene", SynthConfig(width_px=128, height_px=128, seed=4))
    src = build_calibration_set([scene], root / "set", n_per_scene=3, window_px=32, prep=PreprocessConfig(n_orient=0))
    return root / "case", {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}


def _calib_case(calib_base, files: dict[str, bytes]) -> None:
    from sarloc.calib.dataset import calibration_problems, read_calibration_manifest
    from sarloc.core.preprocess import PreprocessConfig

    d, _ = calib_base
    d.mkdir(exist_ok=True)
    for p in d.iterdir():
        p.unlink()
    for name, b in files.items():
        write(d / name, b)
    outcome("calibration set: read_calibration_manifest", lambda: read_calibration_manifest(d))
    probs = outcome(
        "calibration set: calibration_problems",
        lambda: calibration_problems(d, 32, PreprocessConfig(n_orient=0), expect_sha256=None),
    )
    _one_line_strings(probs)
    if probs == []:  # judged usable: the INT8 calibrator can read it
        from sarloc.calib.dataset import calibration_feed

        for m in ("sar", "optical"):
            batches = list(calibration_feed(d, m, batch_size=2))
            assert batches and all(b["windows"].shape[1:] == (1, 32, 32) for b in batches)
            assert all(b["windows"].dtype == np.float32 for b in batches)


@fuzz(1000)
@given(data=st.data())
def test_calibration_manifest_mutated(calib_base, data):
    _, files = calib_base
    man = json.loads(files["manifest.json"])
    raw = data.draw(st.one_of(mutated(man, 4).map(to_json_text), json_text_damage(json.dumps(man))))
    _calib_case(
        calib_base, {**files, "manifest.json": raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")}
    )


@fuzz(1000)
@given(data=st.data())
def test_calibration_npy_damaged(calib_base, data):
    _, files = calib_base
    name = data.draw(st.sampled_from(sorted(n for n in files if n != "manifest.json")))
    kind = data.draw(st.sampled_from(["cut", "flip", "missing"]))
    b = files[name] if kind == "missing" else data.draw(cut_or_flipped(files[name], kind, max_flips=6))
    new = {**files, name: b}
    if kind == "missing":
        del new[name]
    if data.draw(st.booleans()):  # keep the recorded sha256 consistent so that the array checks are reached
        man = json.loads(files["manifest.json"])
        if isinstance(man.get("files"), dict):
            man["files"][name] = sha256_bytes(b)
        new["manifest.json"] = json.dumps(man).encode()
    _calib_case(calib_base, new)


# ================================================================================================ 4. run records

TRUTH = {
    "strips": [
        {
            "strip_id": "s0",
            "t0_s": 0.0,
            "t_end_s": 10.0,
            "vehicle_start_xy_m": [0.0, 0.0],
            "vehicle_end_xy_m": [100.0, 0.0],
        },
        {
            "strip_id": "s1",
            "t0_s": 12.0,
            "t_end_s": 22.0,
            "vehicle_start_xy_m": [110.0, 0.0],
            "vehicle_end_xy_m": [210.0, 0.0],
        },
    ]
}
FIX = {
    "type": "fix",
    "strip_id": "s0",
    "t_s": 5.0,
    "xy_m": [51.0, -2.0],
    "trusted": True,
    "confidence": 0.93,
    "n_inliers": 3,
    "n_windows": 5,
    "accepted": True,
}
START = {
    "type": "start",
    "config": {
        "source": "dir://strips",
        "export": "exp",
        "pack": "pack",
        "out": "o",
        "localizer": {"k": 10},
        "fusion": {"gate_m": 150.0},
        "mavlink_opts": {},
    },
    "artifacts": {"pack": "x"},
}


@st.composite
def record_lines(draw) -> bytes:
    """A records file: valid, mutated and damaged lines (and sometimes a cut last line)."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["fix", "mutated", "start", "value", "damaged"]))
        if kind == "fix":
            lines.append(json.dumps(FIX).encode())
        elif kind == "mutated":
            lines.append(
                to_json_text(draw(mutated(draw(st.sampled_from([FIX, START])), 3))).encode("utf-8", "surrogatepass")
            )
        elif kind == "start":
            lines.append(json.dumps(START).encode())
        elif kind == "value":
            lines.append(to_json_text(draw(json_value_huge)).encode("utf-8", "surrogatepass"))
        else:
            lines.append(draw(json_text_damage(json.dumps(FIX))))
    text = b"\n".join(lines)
    if text and draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _check_stats(stats: Any) -> None:
    if isinstance(stats, dict):
        assert 0 <= stats["n_trusted"] <= stats["n_records"] and stats["n_scored"] <= stats["n_trusted"]
        for k in ("median_m", "p90_m", "max_m", "mean_m", "false_fix_rate"):
            assert stats[k] is None or math.isfinite(stats[k]), (k, stats[k])


@fuzz(1000)
@given(text=record_lines(), threshold=st.sampled_from([None, 0.5]))
def test_report_fixes(work, text, threshold):
    from sarloc.eval.report import format_report, load_fixes, score_fixes

    p = write(work / "records.jsonl", text)
    outcome("run records: load_fixes (sarloc report)", lambda: load_fixes(p))
    stats = outcome("run records: score_fixes (sarloc report)", lambda: score_fixes(p, TRUTH, threshold=threshold))
    _check_stats(stats)
    if isinstance(stats, dict):
        assert isinstance(format_report(stats), str)


@fuzz(1000)
@given(data=st.data())
def test_report_truth(work, data):
    from sarloc.eval.report import load_truth, score_fixes

    raw = data.draw(st.one_of(mutated(TRUTH, 4).map(to_json_text), json_text_damage(json.dumps(TRUTH))))
    p = write(work / "truth.json", raw)
    truth = outcome("run records: load_truth (sarloc report)", lambda: load_truth(p))
    if isinstance(truth, dict):
        _check_stats(score_fixes([FIX, {**FIX, "t_s": 15.0}], truth))


@fuzz(1000)
@given(text=record_lines())
def test_replay_and_resume_records(work, text):
    from sarloc.eval.replay import compare_fixes, read_records, session_config
    from sarloc.runtime.daemon import RunConfig, done_strips

    p = write(work / "records.jsonl", text)
    recs = outcome("run records: read_records (sarloc replay)", lambda: read_records(p))
    done = outcome("run records: done_strips (resume)", lambda: done_strips(p))
    assert isinstance(done, set) and all(isinstance(s, str) for s in done)
    if isinstance(recs, list):
        diffs = outcome("run records: compare_fixes (sarloc replay)", lambda: compare_fixes(recs, recs))
        _one_line_strings(diffs)
        assert diffs == [], "a record file compared with itself must agree"
        cfg = outcome("run records: session_config (sarloc replay)", lambda: session_config(recs, p, work / "out"))
        assert cfg is None or isinstance(cfg, (RunConfig, SarlocError))


# ================================================================================================ 5. checkpoint.json


@fuzz(1000)
@given(data=st.data())
def test_read_checkpoint_sha256(work, data):
    from sarloc.export.onnx import read_checkpoint_sha256

    d = work / "ckpt"
    d.mkdir(exist_ok=True)
    ckpt = write(d / "checkpoint.pt", b"weights")
    base = {"kind": "sarloc.checkpoint", "sha256": "ab" * 32}
    write(
        d / "checkpoint.json",
        data.draw(st.one_of(mutated(base, 2).map(to_json_text), json_text_damage(json.dumps(base)))),
    )
    sha = outcome("checkpoint manifest: read_checkpoint_sha256 (export)", lambda: read_checkpoint_sha256(ckpt))
    assert isinstance(sha, str) and len(sha) == 64


# ================================================================================================ 6. GeoTIFF basemaps

GEOTIFF_DTYPES = ["uint8", "uint16", "int16", "int32", "float32", "float64", "complex64"]
GEOTIFF_CRS = [None, "EPSG:32631", "EPSG:4326", "EPSG:3857", "EPSG:2154", "+proj=ortho +lat_0=40 +lon_0=10"]


@st.composite
def geotiffs(draw) -> bytes:
    """A small GeoTIFF of a random dtype, band count, CRS, pixel size and nodata, whole or damaged."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    dtype = draw(st.sampled_from(GEOTIFF_DTYPES))
    count = draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    crs = draw(st.sampled_from(GEOTIFF_CRS))
    geographic = crs == "EPSG:4326"
    res = draw(st.sampled_from([1e-5, 1e-4, 0.5, 10.0, 1e4] if geographic else [1e-3, 0.5, 10.0, 30.0, 1e5]))
    x0 = draw(st.sampled_from([2.35, -179.99, 179.9]) if geographic else st.sampled_from([440000.0, 0.0, -2e7]))
    y0 = draw(st.sampled_from([48.85, 89.99, -89.0]) if geographic else st.sampled_from([5400000.0, 0.0, 1e7]))
    rot = draw(st.sampled_from([0.0, 0.0, 0.1 * res]))
    transform = Affine(res, rot, x0, rot, -res, y0)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = (rng.random((count, h, w)) * 200).astype(dtype)
    if np.issubdtype(data.dtype, np.floating) and draw(st.booleans()):
        data.reshape(-1)[rng.integers(0, data.size, max(1, data.size // 4))] = draw(st.sampled_from([np.nan, np.inf]))
    nodata = draw(st.sampled_from([None, 0, 255]))
    if nodata is not None and dtype in ("complex64",):
        nodata = None
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=w, height=h, count=count, dtype=dtype, crs=crs, transform=transform,
                      nodata=nodata) as dst:  # fmt: skip
            dst.write(data)
        raw = bytes(mem.read())
    del rasterio
    kind = draw(st.sampled_from(["whole", "whole", "cut", "flip"]))
    return raw if kind == "whole" else draw(cut_or_flipped(raw, kind, max_flips=6))


@fuzz(1000)
@given(tif=geotiffs())
def test_geotiff_basemap(work, tif):
    from sarloc.mappack.basemap import open_basemap

    p = write(work / "basemap.tif", tif)

    def load() -> tuple[Any, np.ndarray, np.ndarray]:
        bm = open_basemap(p)
        try:
            g = bm.grid
            lum, valid = bm.read(0, 0, min(g.width_px, 32), min(g.height_px, 32))
            return g, lum, valid
        finally:
            bm.close()

    got = outcome("GeoTIFF basemaps: open_basemap + read", load)
    if isinstance(got, tuple):  # accepted: a metric grid and a luminance whose valid pixels are finite
        g, lum, valid = got
        assert g.width_px >= 1 and g.height_px >= 1 and g.gsd_m > 0 and math.isfinite(g.gsd_m)
        assert lum.shape == valid.shape and lum.dtype == np.float32 and np.isfinite(lum[valid]).all()
