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
see ``sarloc.backends.encoders.load_encoder_pair``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sarloc.backends.layout import input_chw, manifest_path, read_model_manifest
from sarloc.backends.tensorrt import (
    ENGINE_KIND,
    GpuInfo,
    current_gpu,
    default_engine_path,
    engine_manifest_path,
    import_tensorrt,
)
from sarloc.core.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    make_manifest,
    read_json,
    sha256_bytes,
    sha256_file,
)
from sarloc.core.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

TIMING_CACHE_KIND = "sarloc.trt-timing-cache"
RUNTIME_BATCH_SIZES = (1, 8, 32)
"""Batch sizes the runtime embeds with: 1 (one live SAR window), 8 (a strip's windows), 32 (map-pack tiles)."""


@dataclass(frozen=True)
class BuildPlan:
    """How a network is built: strongly typed or not, which builder flags, and the resulting precision label."""

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    precision: str


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


def _parse_onnx(trt, builder, trt_logger, onnx_path: Path, plan: BuildPlan, in_name: str, version: str):
    """The network parsed from ``onnx_path`` and its parser (keep the parser alive until the engine is built: it
    owns the weights).

    Raises:
        ArtifactError: TensorRT cannot parse the model, or its inputs differ from the manifest's.
    """
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ArtifactError(f"TensorRT {version} could not parse {onnx_path}: {errs[0] if errs else 'unknown error'}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [in_name]:
        raise ArtifactError(f"{onnx_path}: network inputs {names} differ from the manifest's [{in_name!r}]")
    return network, parser


def _builder_config(trt, builder, plan: BuildPlan, in_name: str, shapes: tuple, workspace_mib: int):
    """Builder config: workspace limit, the plan's builder flags, one optimisation profile ``shapes`` (min, opt,
    max) on the input."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(in_name, *shapes)
    config.add_optimization_profile(profile)
    return config


def _use_timing_cache(config, cache_file: Path, key: str) -> None:
    """Start the build from the cached timings of ``cache_file`` when they match ``key`` (else an empty cache)."""
    cache = config.create_timing_cache(_load_timing_cache(cache_file, key))
    if cache is None:  # TensorRT rejected the bytes
        logger.warning("TensorRT rejected timing cache %s; starting an empty one", cache_file)
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(
    config, cache_file: Path, key: str, man: dict, version: str, gpu: GpuInfo, plan: BuildPlan
) -> dict[str, str]:
    """Write the build's timing cache and its manifest; returns the engine manifest's ``timing_cache`` entry."""
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
    return {"file": str(cache_file), "key": key}


def _engine_manifest(
    out: Path,
    onnx_path: Path,
    man: dict,
    version: str,
    gpu: GpuInfo,
    plan: BuildPlan,
    shapes: tuple,
    batch_sizes: tuple[int, ...],
    cache_info: dict[str, str] | None,
) -> dict:
    """The manifest of engine ``out`` built from ``onnx_path`` (manifest ``man``)."""
    pmin, popt, pmax = shapes
    return make_manifest(
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
        profiles=[{"input": man["input"]["name"], "min": list(pmin), "opt": list(popt), "max": list(pmax)}],
        batch_sizes=sorted({int(b) for b in batch_sizes}),
        timing_cache=cache_info,
        **{k: man[k] for k in ("modality", "input", "output", "embed_dim", "window_px", "preprocess")},
        checkpoint_sha256=man.get("checkpoint_sha256"),
    )


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
    shapes = profile_shapes(chw, batch_sizes)
    in_name = man["input"]["name"]

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network, _parser = _parse_onnx(trt, builder, trt_logger, onnx_path, plan, in_name, version)
    config = _builder_config(trt, builder, plan, in_name, shapes, workspace_mib)
    key = timing_cache_key(version, gpu, man["sha256"], plan.precision)
    cache_file = timing_cache_path(timing_cache_dir, key) if timing_cache_dir is not None else None
    if cache_file is not None:
        _use_timing_cache(config, cache_file, key)

    logger.info(
        "building %s (%s, profile %s..%s..%s, TensorRT %s, %s sm_%s)",
        out.name,
        plan.precision,
        shapes[0][0],
        shapes[1][0],
        shapes[2][0],
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
        cache_info = _save_timing_cache(config, cache_file, key, man, version, gpu, plan)
    engine_man = _engine_manifest(out, onnx_path, man, version, gpu, plan, shapes, batch_sizes, cache_info)
    atomic_write_json(engine_manifest_path(out), engine_man)
    return out
