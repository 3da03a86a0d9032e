"""Explicit INT8 quantisation (torch-free): FP32 ONNX + calibration set -> INT8 Q/DQ ONNX with a manifest.

``onnxruntime.quantization.quantize_static`` in QDQ format with symmetric INT8 activations (zero point 0, as
TensorRT requires) and symmetric per-channel INT8 weights. The result runs in ONNX Runtime on CPU/ARM and is
what TensorRT builds INT8 engines from (explicit quantization; TensorRT's implicit calibrators are deprecated
since 10.1 and gone in 11). A stale or mismatched calibration set is rebuilt from its scenes with a warning.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.backends.layout import MODALITIES, ONNX_KIND, input_chw, manifest_path, model_path, read_model_manifest
from sarloc.calib.dataset import (
    DEFAULT_N_PER_SCENE,
    build_calibration_set,
    calibration_feed,
    calibration_problems,
    ensure_calibration_set,
    read_calibration_manifest,
)
from sarloc.core.artifacts import atomic_write_bytes, atomic_write_json, make_manifest, sha256_file
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError
from sarloc.core.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
QUANT_OPS = ("Conv", "Gemm", "MatMul", "Add")
"""Ops whose inputs get Q/DQ: the compute-heavy ones plus residual adds (TensorRT's Q/DQ placement guidance).
Pooling, normalisation and the parameter-free layout branch stay float: quantising them too (ONNX Runtime's
default) cost the tiny test encoder 0.08 of min cosine to FP32 (0.92 vs 0.9985) for no speed gain."""
HOLDOUT_EVERY = 8
"""Every 8th calibration row is held out of calibration and used to compare INT8 with FP32."""

InputSpecs = dict[str, tuple[list[int | None], np.dtype]]


def model_input_specs(session: Any) -> InputSpecs:
    """``{name: (shape with None for dynamic axes, numpy dtype)}`` of an ONNX Runtime session's inputs."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    specs: InputSpecs = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else None for d in i.shape]
        specs[i.name] = (shape, np.dtype(types.get(i.type, np.float32)))
    return specs


def check_feed(feed: dict[str, Any], specs: InputSpecs, what: str = "calibration data") -> dict[str, np.ndarray]:
    """Check one ``{input_name: ndarray}`` feed against a model's inputs (Polygraphy's contract).

    Raises:
        SarlocError: a missing or unexpected input, a wrong dtype, rank or static dimension; the message names
            the input.
    """
    if not isinstance(feed, dict):
        raise SarlocError(f"{what}: each item must be a dict {{input_name: ndarray}}, got {type(feed).__name__}")
    extra = sorted(set(feed) - set(specs))
    if extra:
        raise SarlocError(f"{what}: unexpected input {extra[0]!r}; the model's inputs are {sorted(specs)}")
    for name, (shape, dtype) in specs.items():
        if name not in feed:
            raise SarlocError(f"{what}: input {name!r} is missing from the feed")
        a = feed[name]
        if not isinstance(a, np.ndarray):
            raise SarlocError(f"{what}: input {name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtype:
            raise SarlocError(f"{what}: input {name!r} has dtype {a.dtype}, the model takes {dtype}")
        want = tuple("?" if d is None else d for d in shape)
        if a.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape, strict=True)):
            raise SarlocError(f"{what}: input {name!r} has shape {a.shape}, the model takes {want}")
    return feed


def _reader(feeds: Iterable[dict[str, np.ndarray]], specs: InputSpecs, what: str):
    """Wrap a feed generator as an ``onnxruntime.quantization.CalibrationDataReader`` that checks each feed."""
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            if feed is None:
                return None
            self.count += 1
            return check_feed(feed, specs, what)

    return _FeedReader()


def _session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def int8_path_for(onnx_path: str | Path) -> Path:
    """``M.onnx`` -> ``M.int8.onnx``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".int8.onnx")


def _ensure_calibration_fits(
    calib_path: Path,
    onnx_path: Path,
    window_px: int,
    prep: PreprocessConfig,
    expect_calib_sha256: str | None,
    scene_dirs: Sequence[str | Path] | None,
    n_per_scene: int | None,
) -> None:
    """Rebuild a stale calibration set, or one that does not fit the model, with a warning.

    Raises:
        ArtifactError: the set is unusable and there are no scenes to rebuild it from.
    """
    problems = calibration_problems(calib_path, window_px, prep, expect_calib_sha256)
    if not problems:
        return
    old: dict[str, Any] = {}
    try:
        old = read_calibration_manifest(calib_path)
    except ArtifactError:
        pass
    recorded = [s["path"] for s in old.get("scenes", []) if (Path(s["path"]) / "scene.json").is_file()]
    scenes = list(scene_dirs) if scene_dirs else recorded
    if not scenes:
        raise ArtifactError(
            f"calibration set {calib_path} is unusable ({problems[0]}) and cannot be rebuilt: "
            "pass the scenes (`sarloc calib --scenes ...`)"
        )
    logger.warning(
        "calibration set %s is stale or does not fit %s (%s); recalibrating from %d scene(s)",
        calib_path,
        onnx_path.name,
        "; ".join(problems),
        len(scenes),
    )
    n = n_per_scene or int(old.get("n_per_scene") or DEFAULT_N_PER_SCENE)
    build_calibration_set(scenes, calib_path, n, window_px, prep, int(old.get("seed") or 0))


def _split_rows(calib_path: Path, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration rows and held-out rows (every :data:`HOLDOUT_EVERY`-th; the last one when there is none).

    Raises:
        ArtifactError: no row is left to calibrate with.
    """
    rows = np.arange(n_rows)
    hold = rows[rows % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    calib_rows = rows[rows % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if len(hold) == 0:
        hold = rows[-1:]
    if len(calib_rows) == 0:
        raise ArtifactError(f"calibration set {calib_path} holds {n_rows} windows; too few to calibrate")
    return calib_rows, hold


def _quantize_static(ort_quant: Any, onnx_path: Path, pre: Path, q: Path, reader: Any, calibrate_method: str) -> None:
    """ONNX Runtime's pre-processing, then static QDQ quantisation with symmetric INT8 (see the module docstring).

    Args:
        ort_quant: the ``onnxruntime.quantization`` module.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": ort_quant.CalibrationMethod.MinMax,
        "entropy": ort_quant.CalibrationMethod.Entropy,
        "percentile": ort_quant.CalibrationMethod.Percentile,
    }
    # shape inference + basic graph optimisation, as ONNX Runtime recommends before static quantisation
    # (symbolic shape inference is skipped: it cannot follow F.normalize's Expand; ONNX's own suffices)
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    ort_quant.quantize_static(
        str(pre),
        str(q),
        reader,
        quant_format=ort_quant.QuantFormat.QDQ,
        activation_type=ort_quant.QuantType.QInt8,
        weight_type=ort_quant.QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=list(QUANT_OPS),
        calibrate_method=methods[calibrate_method],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def _agreement(a: np.ndarray, b: np.ndarray, custom_feed: bool) -> dict[str, Any]:
    """How close the INT8 embeddings ``b`` are to the FP32 ones ``a`` of the same windows."""
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "windows": len(a),
        "source": "calibration hold-out" if not custom_feed else "calibration set rows (custom feed calibrated)",
    }


def _write_int8_manifest(
    out: Path,
    onnx_path: Path,
    man: dict[str, Any],
    cman: dict[str, Any],
    calib_path: Path,
    calibrate_method: str,
    calib_rows: int | None,
    agreement: dict[str, Any],
) -> None:
    """Write the manifest of the INT8 model ``out`` quantised from ``onnx_path`` (manifest ``man``) with the
    calibration set ``calib_path`` (manifest ``cman``; ``calib_rows`` of it, None for a custom feed)."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(out), load_external_data=False)
    man8 = make_manifest(
        ONNX_KIND,
        parent_sha256=man["sha256"],
        file=out.name,
        sha256=sha256_file(out),
        modality=man["modality"],
        precision="int8",
        opset=int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
        parent={"file": onnx_path.name, "sha256": man["sha256"]},
        input=man["input"],
        output=man["output"],
        embed_dim=man["embed_dim"],
        window_px=int(man["window_px"]),
        preprocess=man["preprocess"],
        encoder=man.get("encoder"),
        checkpoint=man.get("checkpoint"),
        checkpoint_sha256=man.get("checkpoint_sha256"),
        ops=sorted({n.op_type for n in proto.graph.node}),
        quantization={
            "format": "QDQ",
            "activations": "int8, symmetric (zero point 0), per tensor",
            "weights": "int8, symmetric, per output channel",
            "op_types": list(QUANT_OPS),
            "calibrate_method": calibrate_method,
            "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        },
        calibration={
            "path": str(calib_path.resolve()),
            "sha256": cman["sha256"],
            "rows": calib_rows,
            "scenes": [s["name"] for s in cman.get("scenes", [])],
        },
        int8_vs_fp32=agreement,
    )
    atomic_write_json(manifest_path(out), man8)


def quantize_int8(
    onnx_path: str | Path,
    calib_path: str | Path,
    out_path: str | Path | None = None,
    *,
    scene_dirs: Sequence[str | Path] | None = None,
    n_per_scene: int | None = None,
    calibrate_method: str = "minmax",
    batch_size: int = 16,
    expect_calib_sha256: str | None = None,
    feeds: Iterable[dict[str, np.ndarray]] | None = None,
) -> Path:
    """Quantise an exported FP32 encoder to an INT8 Q/DQ ONNX model with its manifest.

    Args:
        onnx_path: FP32 model written by ``sarloc export`` (manifest beside it).
        calib_path: calibration folder (:func:`sarloc.calib.dataset.build_calibration_set`). When it is
            stale or does not fit the model (files, shape, preprocessing, ``expect_calib_sha256``, changed
            scenes) it is rebuilt, with a warning, from ``scene_dirs`` or else from the scenes it records.
        out_path: INT8 model path (default ``M.int8.onnx`` beside ``M.onnx``).
        scene_dirs: scenes to rebuild a stale set from.
        n_per_scene: windows per scene when rebuilding (default: the set's, else 32).
        calibrate_method: "minmax", "entropy" or "percentile" (ONNX Runtime calibrators).
        batch_size: calibration batch.
        expect_calib_sha256: the calibration set the caller expects (e.g. from a previous INT8 manifest).
        feeds: a custom data source (generator of ``{input_name: ndarray}``) used instead of the set's
            calibration split; each feed is checked against the model's inputs.

    Returns:
        The INT8 model path.

    Raises:
        ArtifactError: the FP32 model is missing/modified/not FP32, or the set is stale and cannot be rebuilt.
        SarlocError: a feed does not match the model's input (the message names the input).
    """
    from onnxruntime import quantization as ort_quant  # first: without ONNX Runtime nothing is read or rebuilt

    if calibrate_method not in CALIB_METHODS:
        raise ConfigError(f"calibrate_method must be one of {CALIB_METHODS}, got {calibrate_method!r}")
    onnx_path = Path(onnx_path)
    man = read_model_manifest(onnx_path)
    if man["precision"] != "fp32":
        raise ArtifactError(f"{onnx_path} is {man['precision']}; quantise the FP32 model")
    out = Path(out_path) if out_path is not None else int8_path_for(onnx_path)
    calib_path = Path(calib_path)
    prep = PreprocessConfig(**man["preprocess"])
    window_px = int(man["window_px"])
    modality = man["modality"]
    input_name = man["input"]["name"]

    _ensure_calibration_fits(calib_path, onnx_path, window_px, prep, expect_calib_sha256, scene_dirs, n_per_scene)
    cman = read_calibration_manifest(calib_path)
    calib_rows, hold = _split_rows(calib_path, int(cman["n"]))

    fp32 = _session(onnx_path)
    specs = model_input_specs(fp32)
    source = feeds if feeds is not None else calibration_feed(calib_path, modality, input_name, batch_size, calib_rows)
    reader = _reader(source, specs, f"calibration data for {onnx_path.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out.parent) as td:
        pre, q = Path(td) / "pre.onnx", Path(td) / "int8.onnx"
        _quantize_static(ort_quant, onnx_path, pre, q, reader, calibrate_method)
        if reader.count == 0:
            raise ArtifactError(f"calibration data for {onnx_path.name} was empty; nothing to calibrate with")
        held = np.ascontiguousarray(np.load(calib_path / f"{modality}.npy", mmap_mode="r")[hold])
        a = fp32.run(None, {input_name: held})[0]
        b = _session(q).run(None, {input_name: held})[0]
        atomic_write_bytes(out, q.read_bytes())
    agreement = _agreement(a, b, feeds is not None)
    rows = len(calib_rows) if feeds is None else None
    _write_int8_manifest(out, onnx_path, man, cman, calib_path, calibrate_method, rows, agreement)
    logger.info(
        "%s: INT8 vs FP32 on %d held-out windows: min cosine %.4f, max |diff| %.3f",
        out.name,
        len(held),
        agreement["min_cosine"],
        agreement["max_abs_diff"],
    )
    return out


def calibrate_export(
    export_dir: str | Path,
    scene_dirs: Sequence[str | Path],
    n_per_scene: int = DEFAULT_N_PER_SCENE,
    seed: int = 0,
    calib_dir: str | Path | None = None,
    calibrate_method: str = "minmax",
) -> dict[str, Path]:
    """Build (or reuse) the calibration set and write INT8 models beside an export folder's FP32 models.

    Returns:
        ``{"calibration": CALIB_DIR, "sar": INT8 path, "optical": INT8 path}``.
    """
    export_dir = Path(export_dir)
    mans = {m: read_model_manifest(model_path(export_dir, m)) for m in MODALITIES}
    w, prep_d = mans["sar"]["window_px"], mans["sar"]["preprocess"]
    if mans["optical"]["window_px"] != w or mans["optical"]["preprocess"] != prep_d:
        raise ArtifactError(f"{export_dir}: SAR and optical models differ in window size or preprocessing; re-export")
    chw = input_chw(mans["sar"])
    if chw[1] != w:
        raise ArtifactError(f"{model_path(export_dir, 'sar')}: input {chw} does not match window_px {w}")
    calib = Path(calib_dir) if calib_dir is not None else export_dir / "calib"
    ensure_calibration_set(scene_dirs, calib, n_per_scene, w, PreprocessConfig(**prep_d), seed)
    out: dict[str, Path] = {"calibration": calib}
    for m in MODALITIES:
        out[m] = quantize_int8(
            model_path(export_dir, m),
            calib,
            model_path(export_dir, m, "int8"),
            scene_dirs=scene_dirs,
            n_per_scene=n_per_scene,
            calibrate_method=calibrate_method,
        )
    return out
