"""TensorRT engines at run time (torch-free; TensorRT and the CUDA binding imported lazily): loading, the engine
manifest and its compatibility check against this machine's TensorRT and GPU."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.backends.layout import check_encoder_fields
from sarloc.core.artifacts import (
    read_json,
    sha256_file,
)
from sarloc.core.errors import ArtifactError, SarlocError

logger = logging.getLogger(__name__)


ENGINE_KIND = "sarloc.trt-engine"
INSTALL_HINT = "pip install 'sarloc[gpu]' on a CUDA machine; on Jetson TensorRT comes with JetPack (python3-libnvinfer)"


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device: marketing name and compute capability ("8.7" for Jetson Orin)."""

    name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready dict."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# lazy imports


def import_tensorrt():
    """``import tensorrt``, or a one-line SarlocError saying how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise SarlocError(f"TensorRT is not available ({type(e).__name__}): {INSTALL_HINT}") from None
    return trt


class _CudaPython:
    """Device buffers and streams through cuda-python's runtime bindings (NVIDIA's recommended binding)."""

    name = "cuda-python"

    def __init__(self, device: int) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        self._call(cudart.cudaSetDevice(device), "cudaSetDevice")

    def _call(self, res: Any, what: str) -> Any:
        err, rest = res[0], res[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise SarlocError(f"CUDA {what} failed: {err}")
        return rest[0] if len(rest) == 1 else None

    def device_info(self, device: int) -> GpuInfo:
        p = self._call(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = p.name.decode(errors="replace") if isinstance(p.name, bytes) else str(p.name)
        return GpuInfo(name.split("\x00", 1)[0].strip(), f"{p.major}.{p.minor}")

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def stream_create(self) -> Any:
        return self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def htod(self, ptr: int, arr: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def dtoh(self, arr: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def synchronize(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def close(self) -> None:
        pass


class _PyCuda:
    """The same through pycuda (the design card's binding), on the device's primary context (shared with TRT)."""

    name = "pycuda"

    def __init__(self, device: int) -> None:
        import pycuda.driver as drv

        drv.init()
        self.drv = drv
        self._ctx = drv.Device(device).retain_primary_context()
        self._ctx.push()
        self._allocs: dict[int, Any] = {}

    def device_info(self, device: int) -> GpuInfo:
        dev = self.drv.Device(device)
        major, minor = dev.compute_capability()
        return GpuInfo(dev.name(), f"{major}.{minor}")

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def stream_create(self) -> Any:
        return self.drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_destroy(self, stream: Any) -> None:
        pass  # freed with the object

    def htod(self, ptr: int, arr: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(ptr, arr, stream)

    def dtoh(self, arr: np.ndarray, ptr: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(arr, ptr, stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.pop()
            self._ctx = None


def cuda_api(device: int = 0) -> _CudaPython | _PyCuda:
    """The first CUDA binding that imports: cuda-python, then pycuda; else a one-line SarlocError."""
    for cls in (_CudaPython, _PyCuda):
        try:
            return cls(device)
        except ImportError:
            continue
    raise SarlocError(f"no CUDA Python binding (cuda-python or pycuda) is installed: {INSTALL_HINT}")


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``."""
    api = cuda_api(device)
    try:
        return api.device_info(device)
    finally:
        api.close()


def default_engine_path(onnx_path: str | Path, fp16: bool = False) -> Path:
    """``M.onnx`` -> ``M.engine`` (or ``M.fp16.engine``); ``M.int8.onnx`` -> ``M.int8.engine``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + (".fp16" if fp16 else "") + ".engine")


def engine_manifest_path(engine_path: str | Path) -> Path:
    """``E.engine`` -> ``E.engine.json`` (not ``E.json``: that is the manifest of the ONNX model ``E.onnx``)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


# ----------------------------------------------------------------------------------------------
# loading checks


def read_engine_manifest(engine_path: str | Path, verify_sha256: bool = True) -> dict[str, Any]:
    """Read an engine's manifest (``E.engine.json`` beside ``E.engine``) and check the engine's sha256."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ArtifactError(f"TensorRT engine {engine_path} not found; build it with `sarloc build-engine`")
    mpath = engine_manifest_path(engine_path)
    man = read_json(mpath, "engine manifest")
    if man.get("kind") != ENGINE_KIND:
        raise ArtifactError(f"{mpath} is not a sarloc engine manifest (kind {man.get('kind')!r})")
    if verify_sha256 and sha256_file(engine_path) != man.get("sha256"):
        raise ArtifactError(
            f"engine {engine_path} does not match its manifest sha256 (modified or truncated); rebuild it"
        )
    fix = "rebuild the engine with `sarloc build-engine`"
    check_encoder_fields(man, mpath, fix)
    for key in ("tensorrt_version", "gpu_name", "compute_capability"):
        if not isinstance(man.get(key), str):
            raise ArtifactError(f"{mpath}: manifest field {key!r} must be a string; {fix}")
    out, onnx, profiles = man.get("output"), man.get("onnx"), man.get("profiles")
    if not (isinstance(out, dict) and isinstance(out.get("name"), str)):
        raise ArtifactError(f"{mpath}: manifest field 'output' must be an object with a string 'name'; {fix}")
    if onnx is not None and not (isinstance(onnx, dict) and isinstance(onnx.get("file", ""), str)):
        raise ArtifactError(f"{mpath}: manifest field 'onnx' must be an object with a string 'file'; {fix}")
    pmax = profiles[0].get("max") if isinstance(profiles, list) and profiles and isinstance(profiles[0], dict) else None
    if not (
        isinstance(pmax, list) and pmax and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pmax)
    ):
        raise ArtifactError(f"{mpath}: manifest field 'profiles' must hold a 'max' shape of positive integers; {fix}")
    return man


def check_engine_manifest(
    manifest: dict[str, Any],
    current_trt_version: str,
    current_gpu: GpuInfo,
    allow_other_gpu_model: bool = False,
) -> None:
    """Refuse an engine built for another TensorRT version or GPU.

    TensorRT plans are specific to the TensorRT version and to the GPU's compute capability; a different GPU
    model of the same compute capability loads but may run slowly, so it is refused unless
    ``allow_other_gpu_model``.

    Raises:
        ArtifactError: one line naming the engine, what differs and the fix (rebuild, or use ONNX Runtime).
    """
    name = manifest.get("file", "engine")
    onnx = manifest.get("onnx")
    onnx = onnx.get("file", "M.onnx") if isinstance(onnx, dict) else "M.onnx"
    fix = f"rebuild it here with `sarloc build-engine --onnx {onnx} --out {name}` or use the ONNX Runtime backend"
    if manifest.get("kind") != ENGINE_KIND:
        raise ArtifactError(f"{name}: not a sarloc engine manifest (kind {manifest.get('kind')!r})")
    built = manifest.get("tensorrt_version")
    if built != current_trt_version:
        raise ArtifactError(
            f"engine {name} was built with TensorRT {built}, this machine has {current_trt_version}; {fix}"
        )
    cc = manifest.get("compute_capability")
    if cc != current_gpu.compute_capability:
        raise ArtifactError(
            f"engine {name} was built for {manifest.get('gpu_name')} (compute capability {cc}), this GPU is "
            f"{current_gpu.name} ({current_gpu.compute_capability}); {fix}"
        )
    if manifest.get("gpu_name") != current_gpu.name:
        msg = (
            f"engine {name} was built on {manifest.get('gpu_name')}, this GPU is {current_gpu.name} "
            "(same compute capability)"
        )
        if not allow_other_gpu_model:
            raise ArtifactError(f"{msg}; {fix}")
        logger.warning("%s: it may run slowly", msg)
