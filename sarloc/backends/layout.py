"""Names, file layout and manifests of exported models (torch-free: shared by export, calib and runtime).

An export folder holds, per modality, an FP32 ONNX model and, after ``sarloc calib``, its INT8 Q/DQ twin;
each model has a JSON manifest beside it (same stem, ``.json``)::

    DIR/export.json                          index: checkpoint hash, models, parity
    DIR/sar_encoder.onnx       + .json       FP32, input "windows" (batch, C, H, W) -> "embeddings" (batch, D)
    DIR/optical_encoder.onnx   + .json
    DIR/sar_encoder.int8.onnx  + .json       INT8 Q/DQ (symmetric, per-channel weights), parent = FP32 hash
    DIR/optical_encoder.int8.onnx + .json
    DIR/calib/                               calibration set (see ``sarloc.calib.dataset``)
    DIR/*.engine  + .engine.json             TensorRT engines (see ``sarloc.export.engine``)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sarloc.core.artifacts import read_json, sha256_file
from sarloc.core.errors import ArtifactError
from sarloc.core.preprocess import PreprocessConfig

INPUT_NAME = "windows"
OUTPUT_NAME = "embeddings"
BATCH_AXIS = "batch"
MODALITIES = ("sar", "optical")
PRECISIONS = ("fp32", "int8")
ONNX_KIND = "sarloc.onnx-encoder"
EXPORT_KIND = "sarloc.onnx-export"
DEFAULT_OPSET = 18
#: the shipped demo model (trained on generated scenes only; ``sarloc demo --make-model`` re-trains it)
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
DEMO_MODEL_FILES = (
    "export.json",
    "sar_encoder.onnx",
    "sar_encoder.json",
    "optical_encoder.onnx",
    "optical_encoder.json",
    "refiner.onnx",
    "refiner.json",
    "verifier.json",
    "shortlister.json",
)


def manifest_path(artifact: str | Path) -> Path:
    """The manifest beside an artefact: ``M.onnx`` -> ``M.json``, ``M.int8.onnx`` -> ``M.int8.json``."""
    return Path(artifact).with_suffix(".json")


def model_filename(modality: str, precision: str = "fp32") -> str:
    """File name of an encoder model in an export folder, e.g. ``sar_encoder.int8.onnx``."""
    if modality not in MODALITIES:
        raise ArtifactError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if precision not in PRECISIONS:
        raise ArtifactError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return f"{modality}_encoder.onnx" if precision == "fp32" else f"{modality}_encoder.{precision}.onnx"


def model_path(export_dir: str | Path, modality: str, precision: str = "fp32") -> Path:
    """Path of an encoder model in ``export_dir``."""
    return Path(export_dir) / model_filename(modality, precision)


def read_model_manifest(onnx_path: str | Path, verify_sha256: bool = True) -> dict[str, Any]:
    """Read and check the manifest of an exported ONNX model.

    Args:
        onnx_path: the ``.onnx`` file; its manifest is ``manifest_path(onnx_path)``.
        verify_sha256: also check that the ONNX file's sha256 equals the manifest's.

    Raises:
        ArtifactError: model or manifest missing, manifest malformed or of another kind, or the model
            modified or truncated since export (one line naming the file and the fix).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"ONNX model {onnx_path} not found; export it with `sarloc export`")
    man = read_json(manifest_path(onnx_path), "ONNX model manifest")
    if man.get("kind") != ONNX_KIND:
        raise ArtifactError(
            f"{manifest_path(onnx_path)} is not a sarloc ONNX encoder manifest (kind {man.get('kind')!r})"
        )
    for key in ("sha256", "input", "output", "preprocess", "window_px", "embed_dim", "modality", "precision"):
        if key not in man:
            raise ArtifactError(f"{manifest_path(onnx_path)} lacks field {key!r}; re-export the model")
    if verify_sha256:
        got = sha256_file(onnx_path)
        if got != man["sha256"]:
            raise ArtifactError(
                f"{onnx_path} has sha256 {got[:12]} but its manifest says {str(man['sha256'])[:12]!r} "
                "(modified, truncated or replaced); re-export it with `sarloc export`"
            )
    return man


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_encoder_fields(man: dict[str, Any], where: str | Path, fix: str) -> None:
    """Check the manifest fields an encoder reads (input, sizes, preprocessing) once, at load time.

    Shared by the ONNX Runtime and TensorRT encoders (an engine's manifest copies these fields from its ONNX).

    Args:
        man: the manifest.
        where: the manifest file, for the message.
        fix: what to do about it ("re-export the model", "rebuild the engine ...").

    Raises:
        ArtifactError: one line naming the first malformed field.
    """

    def bad(field: str, want: str) -> ArtifactError:
        return ArtifactError(f"{where}: manifest field {field!r} must be {want}; {fix}")

    inp = man.get("input")
    shape = inp.get("shape") if isinstance(inp, dict) else None
    if not (isinstance(inp, dict) and isinstance(inp.get("name"), str)):
        raise bad("input", "an object with a string 'name'")
    if not (isinstance(shape, list) and len(shape) == 4 and all(map(_pos_int, shape[1:]))):
        raise bad("input.shape", "[batch, C, H, W] with positive integers C, H, W")
    for key in ("embed_dim", "window_px"):
        if not _pos_int(man.get(key)):
            raise bad(key, "a positive integer")
    for key in ("modality", "precision"):
        if not isinstance(man.get(key), str):
            raise bad(key, "a string")
    pre = man.get("preprocess")
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    if not (
        isinstance(pre, dict)
        and set(pre) <= names
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pre.values())
    ):
        raise bad("preprocess", f"an object of finite numbers with keys among {sorted(names)}")


def input_chw(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of a model's input from its manifest (the batch axis is dynamic)."""
    shape = manifest["input"]["shape"]
    return int(shape[1]), int(shape[2]), int(shape[3])
