"""Inference backends for the exported encoders (torch-free): ONNX Runtime and TensorRT.

Both are callables ``(B, C, H, W) float32 -> (B, D) float32`` (an ``EmbedFn`` for ``sarloc.eval.retrieval``), built
from an artefact plus its manifest: the artefact's sha256 is checked against the manifest before loading, and the
input is checked at the boundary (errors name the input). ``load_encoder_pair`` gives the (SAR, optical) pair
of an export folder and falls back from TensorRT to ONNX Runtime when an engine is absent or does not match this
machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.backends.layout import MODALITIES, check_encoder_fields, input_chw, model_path, read_model_manifest
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError
from sarloc.core.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

BACKENDS = ("ort", "trt", "auto")
LOAD_PRECISIONS = ("fp32", "int8", "fp16")


def check_windows(x: Any, chw: tuple[int, int, int], input_name: str, what: str) -> np.ndarray:
    """Check a batch at a model's boundary; return it C-contiguous.

    Raises:
        SarlocError: not a float32 (B, C, H, W) array of the model's C, H, W (the message names the input).
    """
    if not isinstance(x, np.ndarray):
        raise SarlocError(f"{what}: input {input_name!r} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise SarlocError(
            f"{what}: input {input_name!r} must be float32, got {x.dtype} (prepare windows with "
            "sarloc.core.preprocess.prepare_windows)"
        )
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(chw):
        raise SarlocError(f"{what}: input {input_name!r} must be (B, {', '.join(map(str, chw))}), got {tuple(x.shape)}")
    return np.ascontiguousarray(x)


class _ManifestInfo:
    """Properties read from an artefact manifest (shared by the ORT and TensorRT encoders)."""

    manifest: dict[str, Any]

    @property
    def modality(self) -> str:
        """Modality of the model: sar or optical."""
        return str(self.manifest["modality"])

    @property
    def precision(self) -> str:
        """Precision label: fp32, int8, fp16 or int8+fp16."""
        return str(self.manifest["precision"])

    @property
    def embed_dim(self) -> int:
        """Embedding size D."""
        return int(self.manifest["embed_dim"])

    @property
    def window_px(self) -> int:
        """Window side the model takes, pixels."""
        return int(self.manifest["window_px"])

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the model expects (``sarloc.core.preprocess.prepare_windows``)."""
        return PreprocessConfig(**self.manifest["preprocess"])

    @property
    def input_name(self) -> str:
        """Name of the model input."""
        return str(self.manifest["input"]["name"])

    @property
    def input_chw(self) -> tuple[int, int, int]:
        """(C, H, W) of the input; the batch axis is dynamic."""
        return input_chw(self.manifest)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise SarlocError("ONNX Runtime is not installed: pip install 'sarloc[cpu]' (or 'sarloc[gpu]')") from None
    return ort


class OrtEncoder(_ManifestInfo):
    """An exported encoder (FP32 or INT8 Q/DQ ONNX) run by ONNX Runtime.

    Args:
        onnx_path: ``.onnx`` file with its manifest beside it.
        providers: ONNX Runtime execution providers (default: CPU only, deterministic everywhere; pass
            e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` on a GPU machine).
        threads: intra-op threads (0 = ONNX Runtime's default).
        verify_sha256: check the model file against its manifest before loading.

    Raises:
        ArtifactError: model or manifest missing, sha256 mismatch, or a file ONNX Runtime cannot load.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        providers: list[str] | None = None,
        threads: int = 0,
        verify_sha256: bool = True,
    ) -> None:
        self.path = Path(onnx_path)
        self.manifest = read_model_manifest(self.path, verify_sha256=verify_sha256)
        check_encoder_fields(self.manifest, self.path.with_suffix(".json"), "re-export the model")
        ort = _import_ort()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(self.path), so, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # ORT raises several types for corrupt files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ArtifactError(
                f"ONNX model {self.path} could not be loaded by ONNX Runtime ({first}); it is corrupt or "
                "truncated: re-export it with `sarloc export`"
            ) from None
        ins, outs = self._sess.get_inputs(), self._sess.get_outputs()
        if [i.name for i in ins] != [self.input_name] or len(outs) != 1:
            raise ArtifactError(
                f"{self.path}: model inputs {[i.name for i in ins]} do not match its manifest ({self.input_name!r})"
            )
        self._out = outs[0].name

    @property
    def providers(self) -> list[str]:
        """Execution providers in use."""
        return list(self._sess.get_providers())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 prepared windows -> (B, D) float32 unit-norm embeddings."""
        x = check_windows(x, self.input_chw, self.input_name, self.path.name)
        if len(x) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return self._sess.run([self._out], {self.input_name: x})[0]

    def __repr__(self) -> str:
        return f"OrtEncoder({self.path.name}, {self.modality}, {self.precision}, providers={self.providers})"


class TrtEncoder(_ManifestInfo):
    """A TensorRT engine built by ``sarloc build-engine``, with device buffers for the profile's largest batch.

    Written to the TensorRT 10 Python API (named I/O tensors, ``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``); device memory through cuda-python or pycuda (whichever imports). Use as a context
    manager or call :meth:`close` to free the device buffers.

    Args:
        engine_path: ``.engine`` file with its manifest beside it.
        device: CUDA device index.
        allow_other_gpu_model: accept an engine built on another GPU model of the same compute capability.

    Raises:
        SarlocError: TensorRT or the CUDA binding missing (one line with the install hint).
        ArtifactError: engine/manifest missing or modified, built for another TensorRT version or GPU.
    """

    def __init__(self, engine_path: str | Path, device: int = 0, allow_other_gpu_model: bool = False) -> None:
        from sarloc.backends.tensorrt import check_engine_manifest, cuda_api, import_tensorrt, read_engine_manifest

        self.path = Path(engine_path)
        self._cuda: Any = None
        self._ptrs: list[int] = []
        self._stream: Any = None
        self.manifest = read_engine_manifest(self.path)
        trt = import_tensorrt()
        self._cuda = cuda_api(device)
        check_engine_manifest(
            self.manifest, str(trt.__version__), self._cuda.device_info(device), allow_other_gpu_model
        )
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {self.path}; rebuild it with `sarloc build-engine`")
        self._context = self._engine.create_execution_context()
        self._out = str(self.manifest["output"]["name"])
        self.max_batch = int(self.manifest["profiles"][0]["max"][0])
        c, h, w = self.input_chw
        self._in_ptr = self._cuda.malloc(self.max_batch * c * h * w * 4)
        self._ptrs.append(self._in_ptr)
        self._out_ptr = self._cuda.malloc(self.max_batch * self.embed_dim * 4)
        self._ptrs.append(self._out_ptr)
        self._stream = self._cuda.stream_create()
        self._context.set_tensor_address(self.input_name, self._in_ptr)
        self._context.set_tensor_address(self._out, self._out_ptr)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 prepared windows -> (B, D) float32 embeddings (batches above the profile's max
        are split)."""
        x = check_windows(x, self.input_chw, self.input_name, self.path.name)
        out = np.empty((len(x), self.embed_dim), np.float32)
        handle = self._cuda.stream_handle(self._stream)
        for i in range(0, len(x), self.max_batch):
            xb = np.ascontiguousarray(x[i : i + self.max_batch])
            ob = np.empty((len(xb), self.embed_dim), np.float32)
            if not self._context.set_input_shape(self.input_name, tuple(xb.shape)):
                raise SarlocError(
                    f"{self.path.name}: input {self.input_name!r} shape {xb.shape} is outside its profile"
                )
            self._cuda.htod(self._in_ptr, xb, self._stream)
            if not self._context.execute_async_v3(handle):
                raise SarlocError(f"{self.path.name}: TensorRT execution failed")
            self._cuda.dtoh(ob, self._out_ptr, self._stream)
            self._cuda.synchronize(self._stream)
            out[i : i + len(xb)] = ob
        return out

    def close(self) -> None:
        """Free the device buffers and the stream (idempotent)."""
        if self._cuda is None:
            return
        for p in self._ptrs:
            self._cuda.free(p)
        self._ptrs = []
        if self._stream is not None:
            self._cuda.stream_destroy(self._stream)
            self._stream = None
        self._cuda.close()
        self._cuda = None

    def __enter__(self) -> TrtEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finaliser
            pass


def _onnx_for(export_dir: Path, modality: str, precision: str) -> Path:
    p = model_path(export_dir, modality, "int8" if precision == "int8" else "fp32")
    if not p.is_file():
        if precision == "int8":
            raise ArtifactError(
                f"INT8 model {p} not found; build it with `sarloc calib --export {export_dir} --scenes ...`"
            )
        raise ArtifactError(
            f"ONNX model {p} not found; export it with `sarloc export --checkpoint CKPT --out {export_dir}`"
        )
    return p


def _check_parent(child: dict[str, Any], child_path: Path, parent_path: Path) -> None:
    """Refuse a derived artefact (INT8 model, engine) whose parent is no longer the model beside it."""
    if not parent_path.is_file():
        return
    parent = read_model_manifest(parent_path, verify_sha256=False)
    if child.get("parent_sha256") != parent["sha256"]:
        raise ArtifactError(
            f"{child_path.name} was built from another version of {parent_path.name} (re-exported since); "
            "rebuild it (`sarloc calib` for INT8 models, `sarloc build-engine` for engines)"
        )


def load_encoder(
    export_dir: str | Path,
    modality: str,
    precision: str = "fp32",
    backend: str = "ort",
    providers: list[str] | None = None,
    threads: int = 0,
    device: int = 0,
) -> OrtEncoder | TrtEncoder:
    """One encoder of an export folder.

    Args:
        export_dir: folder written by ``sarloc export`` (and ``sarloc calib`` / ``sarloc build-engine``).
        modality: "sar" or "optical".
        precision: "fp32", "int8" (Q/DQ ONNX / its engine) or "fp16" (TensorRT engine built with ``--fp16``).
        backend: "ort" (ONNX Runtime), "trt" (TensorRT engine, errors when unusable) or "auto" (the engine when
            it exists and matches this machine, else ONNX Runtime with a warning).
        providers, threads: ONNX Runtime options (see :class:`OrtEncoder`).
        device: CUDA device for TensorRT.
    """
    from sarloc.backends.tensorrt import default_engine_path

    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in LOAD_PRECISIONS:
        raise ConfigError(f"precision must be one of {LOAD_PRECISIONS}, got {precision!r}")
    if precision == "fp16" and backend == "ort":
        raise ConfigError("precision fp16 exists only as a TensorRT engine: use backend 'trt' or 'auto'")
    export_dir = Path(export_dir)
    onnx = _onnx_for(export_dir, modality, precision)
    if backend in ("trt", "auto"):
        engine = default_engine_path(onnx, fp16=precision == "fp16")
        try:
            enc = TrtEncoder(engine, device=device)
            try:
                _check_parent(enc.manifest, engine, onnx)
            except ArtifactError:
                enc.close()
                raise
            return enc
        except SarlocError as e:
            if backend == "trt":
                raise
            logger.warning("%s; falling back to ONNX Runtime (%s)", e, onnx.name)
    enc_ort = OrtEncoder(onnx, providers=providers, threads=threads)
    if precision == "int8":
        _check_parent(enc_ort.manifest, onnx, model_path(export_dir, modality, "fp32"))
    return enc_ort


def load_encoder_pair(
    export_dir: str | Path,
    precision: str = "fp32",
    backend: str = "ort",
    providers: list[str] | None = None,
    threads: int = 0,
    device: int = 0,
) -> tuple[OrtEncoder | TrtEncoder, OrtEncoder | TrtEncoder]:
    """(SAR encoder, optical encoder) of an export folder, checked to come from one checkpoint.

    See :func:`load_encoder` for the arguments. Both are ``EmbedFn`` callables for ``sarloc.eval.retrieval``.

    Raises:
        ArtifactError: a model missing or modified, or the two models disagree (checkpoint, preprocessing,
            window size, embedding size).
    """
    sar, opt = (load_encoder(export_dir, m, precision, backend, providers, threads, device) for m in MODALITIES)
    for key in ("checkpoint_sha256", "preprocess", "window_px", "embed_dim"):
        if sar.manifest.get(key) != opt.manifest.get(key):
            raise ArtifactError(
                f"{export_dir}: the SAR and optical models differ in {key} ({sar.manifest.get(key)} vs "
                f"{opt.manifest.get(key)}); re-export both from one checkpoint"
            )
    for enc, m in ((sar, "sar"), (opt, "optical")):
        if enc.modality != m:
            raise ArtifactError(f"{enc.path} holds the {enc.modality} encoder, expected {m}")
    return sar, opt
