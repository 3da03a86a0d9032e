"""TensorRT engines from the exported ONNX models: build, manifest, timing cache, compatibility check.

Written to the documented TensorRT 10 Python API; ``tensorrt`` and the CUDA binding (cuda-python's
``cuda.bindings.runtime`` / ``cuda.cudart``, or pycuda) are imported lazily, so this module imports anywhere.

Precision (see :func:`plan_build`):

* TensorRT 10.x (JetPack 6 ships 10.3) still has the weak-typing builder flags: ``--fp16`` sets
  ``BuilderFlag.FP16``; an INT8 Q/DQ model builds as a strongly typed network (its Q/DQ nodes fix the types),
  or weakly typed with INT8 + FP16 flags when FP16 is also asked for.
* TensorRT 11 removed ``BuilderFlag.FP16``/``INT8`` and the implicit INT8 calibrators (deprecated in 10.1): every
  network is strongly typed, INT8 comes only from the Q/DQ ONNX (``sarloc calib``), and FP16 needs an ONNX whose
  tensors are already FP16 (ModelOpt AutoCast); sarloc does not do that conversion, so ``--fp16`` is refused
  there with a message saying so.

An engine only runs with the TensorRT version and the GPU (compute capability) it was built for; its manifest
records both and :func:`check_engine_manifest` refuses a mismatch (the runtime then falls back to ONNX Runtime,
see ``sarloc.runtime.backends.load_encoder_pair``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.artifacts import atomic_write_bytes, atomic_write_json, make_manifest, read_json, sha256_bytes, sha256_file
from sarloc.errors import ArtifactError, ConfigError, SarlocError
from sarloc.export.layout import check_encoder_fields, input_chw, manifest_path, read_model_manifest

logger = logging.getLogger(__name__)

ENGINE_KIND = "sarloc.trt-engine"
TIMING_CACHE_KIND = "sarloc.trt-timing-cache"
RUNTIME_BATCH_SIZES = (1, 8, 32)
"""Batch sizes the runtime embeds with: 1 (one live SAR window), 8 (a strip's windows), 32 (map-pack tiles)."""
INSTALL_HINT = "pip install 'sarloc[gpu]' on a CUDA machine; on Jetson TensorRT comes with JetPack (python3-libnvinfer)"


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device: marketing name and compute capability ("8.7" for Jetson Orin)."""

    name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class BuildPlan:
    """How a network is built: strongly typed or not, which builder flags, and the resulting precision label."""

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    precision: str


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


# ----------------------------------------------------------------------------------------------
# pure planning (tested without TensorRT)


def profile_shapes(
    chw: tuple[int, int, int], batch_sizes: tuple[int, ...] = RUNTIME_BATCH_SIZES
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Optimisation profile (min, opt, max) input shapes for the runtime's batch sizes.

    min = the smallest batch, max = the largest, opt = the median of the distinct sizes (8 for (1, 8, 32), the
    common case; the upper middle for an even count).
    """
    bs = sorted({int(b) for b in batch_sizes})
    if not bs or bs[0] < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {tuple(batch_sizes)}")
    opt = bs[len(bs) // 2]  # the median; with an even count the upper middle
    return (bs[0], *chw), (opt, *chw), (bs[-1], *chw)


def trt_capabilities(trt) -> dict[str, bool]:
    """What a tensorrt module offers: the weak-typing FP16 flag (10.x) and strongly typed networks (>= 9.x)."""
    return {
        "fp16_flag": hasattr(trt.BuilderFlag, "FP16"),
        "int8_flag": hasattr(trt.BuilderFlag, "INT8"),
        "strongly_typed": hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
    }


def plan_build(onnx_precision: str, fp16: bool, caps: dict[str, bool], trt_version: str = "?") -> BuildPlan:
    """Decide network typing and builder flags.

    Args:
        onnx_precision: "fp32" or "int8" (a Q/DQ model) from the ONNX manifest.
        fp16: allow FP16 kernels.
        caps: from :func:`trt_capabilities`.
        trt_version: for messages.

    Raises:
        ArtifactError: FP16 asked for on a TensorRT without the FP16 flag (11.x), or an unknown precision.
    """
    if onnx_precision not in ("fp32", "int8"):
        raise ArtifactError(f"ONNX precision must be 'fp32' or 'int8', got {onnx_precision!r}")
    if fp16 and not caps["fp16_flag"]:
        raise ArtifactError(
            f"TensorRT {trt_version} has no FP16 builder flag (removed in 11): build the FP32 or INT8 Q/DQ model, "
            "or convert the ONNX to FP16 first with ModelOpt AutoCast (not done by sarloc yet)"
        )
    if fp16:
        flags = ("INT8", "FP16") if onnx_precision == "int8" else ("FP16",)
        return BuildPlan(False, flags, "int8+fp16" if onnx_precision == "int8" else "fp16")
    if caps["strongly_typed"]:
        return BuildPlan(True, (), onnx_precision)
    # TensorRT without strongly typed networks (< 10): weak typing, Q/DQ needs the INT8 flag
    return BuildPlan(False, ("INT8",) if onnx_precision == "int8" else (), onnx_precision)


def timing_cache_key(trt_version: str, gpu: GpuInfo, onnx_sha256: str, precision: str) -> str:
    """Hex key of a timing cache: (TensorRT version, GPU name, compute capability, ONNX sha256, precision)."""
    fields = {
        "tensorrt_version": trt_version,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
    }
    return sha256_bytes(json.dumps(fields, sort_keys=True).encode())


def timing_cache_path(cache_dir: str | Path, key: str) -> Path:
    """``cache_dir/trt-timing-<key[:16]>.cache`` (its manifest: same stem, ``.json``)."""
    return Path(cache_dir) / f"trt-timing-{key[:16]}.cache"


def default_engine_path(onnx_path: str | Path, fp16: bool = False) -> Path:
    """``M.onnx`` -> ``M.engine`` (or ``M.fp16.engine``); ``M.int8.onnx`` -> ``M.int8.engine``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + (".fp16" if fp16 else "") + ".engine")


def engine_manifest_path(engine_path: str | Path) -> Path:
    """``E.engine`` -> ``E.engine.json`` (not ``E.json``: that is the manifest of the ONNX model ``E.onnx``)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def _load_timing_cache(path: Path, key: str) -> bytes:
    """Cached timing bytes when the cache and its manifest agree with ``key``; else b"" (warned when stale)."""
    if not path.is_file():
        return b""
    try:
        man = read_json(manifest_path(path), "timing cache manifest")
    except ArtifactError as e:
        logger.warning("%s; starting an empty timing cache", e)
        return b""
    data = path.read_bytes()
    if man.get("kind") != TIMING_CACHE_KIND or man.get("key") != key or man.get("sha256") != sha256_bytes(data):
        logger.warning("timing cache %s is stale or corrupt (key/sha256 mismatch); starting an empty one", path)
        return b""
    return data


# ----------------------------------------------------------------------------------------------
# build


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path | None = None,
    fp16: bool = False,
    batch_sizes: tuple[int, ...] = RUNTIME_BATCH_SIZES,
    timing_cache_dir: str | Path | None = None,
    *,
    gpu: GpuInfo | None = None,
    device: int = 0,
    workspace_mib: int = 1024,
) -> Path:
    """Build a serialised TensorRT engine from an exported ONNX model (FP32 or INT8 Q/DQ) and its manifest.

    Args:
        onnx_path: an ONNX model written by ``sarloc export`` or ``sarloc calib`` (manifest beside it).
        out_path: engine file (default :func:`default_engine_path`); its manifest is ``E.engine.json``.
        fp16: allow FP16 kernels (TensorRT 10.x builder flag; refused on 11.x, see :func:`plan_build`).
        batch_sizes: the runtime's batch sizes; one optimisation profile spans min..max, tuned for the middle.
        timing_cache_dir: folder of timing caches keyed by :func:`timing_cache_key` (None = no cache).
        gpu: the build GPU (default: queried from CUDA device ``device``).
        device: CUDA device index.
        workspace_mib: builder workspace limit.

    Returns:
        The engine path.

    Raises:
        SarlocError: TensorRT or the CUDA binding is missing (one line with the install hint).
        ArtifactError: the ONNX model or its manifest is missing/modified, TensorRT cannot parse or build it.
    """
    onnx_path = Path(onnx_path)
    man = read_model_manifest(onnx_path)
    out = Path(out_path) if out_path is not None else default_engine_path(onnx_path, fp16)
    trt = import_tensorrt()
    version = str(trt.__version__)
    plan = plan_build(man["precision"], fp16, trt_capabilities(trt), version)
    gpu = gpu or current_gpu(device)
    chw = input_chw(man)
    pmin, popt, pmax = profile_shapes(chw, batch_sizes)
    in_name = man["input"]["name"]

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ArtifactError(f"TensorRT {version} could not parse {onnx_path}: {errs[0] if errs else 'unknown error'}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [in_name]:
        raise ArtifactError(f"{onnx_path}: network inputs {names} differ from the manifest's [{in_name!r}]")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(in_name, pmin, popt, pmax)
    config.add_optimization_profile(profile)

    key = timing_cache_key(version, gpu, man["sha256"], plan.precision)
    cache_file = timing_cache_path(timing_cache_dir, key) if timing_cache_dir is not None else None
    if cache_file is not None:
        cache = config.create_timing_cache(_load_timing_cache(cache_file, key))
        if cache is None:  # TensorRT rejected the bytes
            logger.warning("TensorRT rejected timing cache %s; starting an empty one", cache_file)
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    logger.info(
        "building %s (%s, profile %s..%s..%s, TensorRT %s, %s sm_%s)",
        out.name,
        plan.precision,
        pmin[0],
        popt[0],
        pmax[0],
        version,
        gpu.name,
        gpu.compute_capability,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT {version} failed to build an engine from {onnx_path} (see its log above)")
    atomic_write_bytes(out, bytes(memoryview(serialized)))

    cache_info = None
    if cache_file is not None:
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        atomic_write_bytes(cache_file, data)
        atomic_write_json(
            manifest_path(cache_file),
            make_manifest(
                TIMING_CACHE_KIND,
                parent_sha256=man["sha256"],
                key=key,
                sha256=sha256_bytes(data),
                tensorrt_version=version,
                gpu=gpu.to_dict(),
                precision=plan.precision,
            ),
        )
        cache_info = {"file": str(cache_file), "key": key}

    engine_man = make_manifest(
        ENGINE_KIND,
        parent_sha256=man["sha256"],
        file=out.name,
        sha256=sha256_file(out),
        onnx={"file": onnx_path.name, "sha256": man["sha256"], "precision": man["precision"]},
        tensorrt_version=version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=plan.precision,
        strongly_typed=plan.strongly_typed,
        builder_flags=list(plan.builder_flags),
        profiles=[{"input": in_name, "min": list(pmin), "opt": list(popt), "max": list(pmax)}],
        batch_sizes=sorted({int(b) for b in batch_sizes}),
        timing_cache=cache_info,
        **{k: man[k] for k in ("modality", "input", "output", "embed_dim", "window_px", "preprocess")},
        checkpoint_sha256=man.get("checkpoint_sha256"),
    )
    atomic_write_json(engine_manifest_path(out), engine_man)
    return out


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
