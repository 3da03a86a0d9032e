"""TensorRT engine code, tested without TensorRT: planning, manifests, cache keys, mismatch handling, and the
build sequence against a minimal fake of the TensorRT 10 Python API (it checks our calls, not TensorRT)."""

import enum
import json
import shutil
import sys
import types

import numpy as np
import pytest

from sarloc.backends.tensorrt import (
    ENGINE_KIND,
    GpuInfo,
    check_engine_manifest,
    cuda_api,
    default_engine_path,
    import_tensorrt,
    read_engine_manifest,
)
from sarloc.cli import main
from sarloc.core.artifacts import sha256_file
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError
from sarloc.export import engine as eng
from sarloc.export.engine import build_engine, plan_build, profile_shapes, timing_cache_key, timing_cache_path

TRT10 = {"fp16_flag": True, "int8_flag": True, "strongly_typed": True}
TRT11 = {"fp16_flag": False, "int8_flag": False, "strongly_typed": True}
ORIN = GpuInfo("Orin", "8.7")


def test_profile_from_runtime_batch_sizes():
    assert profile_shapes((5, 64, 64)) == ((1, 5, 64, 64), (8, 5, 64, 64), (32, 5, 64, 64))
    assert profile_shapes((3, 32, 32), (32, 1, 8, 8)) == ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert profile_shapes((1, 8, 8), (4,)) == ((4, 1, 8, 8),) * 3
    assert profile_shapes((1, 8, 8), (1, 8, 16, 32))[1][0] == 16
    with pytest.raises(ConfigError, match="batch sizes"):
        profile_shapes((1, 8, 8), (0, 8))


def test_precision_plan_trt10_vs_trt11():
    assert plan_build("fp32", False, TRT10) == eng.BuildPlan(True, (), "fp32")
    assert plan_build("fp32", True, TRT10) == eng.BuildPlan(False, ("FP16",), "fp16")
    assert plan_build("int8", False, TRT10) == eng.BuildPlan(True, (), "int8")
    assert plan_build("int8", True, TRT10) == eng.BuildPlan(False, ("INT8", "FP16"), "int8+fp16")
    assert plan_build("fp32", False, TRT11) == eng.BuildPlan(True, (), "fp32")
    assert plan_build("int8", False, TRT11) == eng.BuildPlan(True, (), "int8")
    with pytest.raises(ArtifactError, match=r"TensorRT 11\.0 has no FP16 builder flag.*AutoCast"):
        plan_build("fp32", True, TRT11, "11.0")
    old = {"fp16_flag": True, "int8_flag": True, "strongly_typed": False}
    assert plan_build("int8", False, old) == eng.BuildPlan(False, ("INT8",), "int8")
    with pytest.raises(ArtifactError, match="precision"):
        plan_build("bf16", False, TRT10)


def test_timing_cache_key_covers_every_field(tmp_path):
    base = timing_cache_key("10.3.0", ORIN, "a" * 64, "fp16")
    assert base == timing_cache_key("10.3.0", GpuInfo("Orin", "8.7"), "a" * 64, "fp16")
    others = [
        timing_cache_key("10.7.0", ORIN, "a" * 64, "fp16"),
        timing_cache_key("10.3.0", GpuInfo("Orin NX", "8.7"), "a" * 64, "fp16"),
        timing_cache_key("10.3.0", GpuInfo("Orin", "8.6"), "a" * 64, "fp16"),
        timing_cache_key("10.3.0", ORIN, "b" * 64, "fp16"),
        timing_cache_key("10.3.0", ORIN, "a" * 64, "int8"),
    ]
    assert len({base, *others}) == 6
    assert timing_cache_path(tmp_path, base).name == f"trt-timing-{base[:16]}.cache"


def test_default_engine_names(tmp_path):
    assert default_engine_path(tmp_path / "sar_encoder.onnx").name == "sar_encoder.engine"
    assert default_engine_path(tmp_path / "sar_encoder.onnx", fp16=True).name == "sar_encoder.fp16.engine"
    assert default_engine_path(tmp_path / "sar_encoder.int8.onnx").name == "sar_encoder.int8.engine"


def _manifest(**kw):
    man = {
        "kind": ENGINE_KIND,
        "file": "sar_encoder.engine",
        "onnx": {"file": "sar_encoder.onnx"},
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
    }
    man.update(kw)
    return man


def test_engine_manifest_mismatch_is_refused(caplog):
    check_engine_manifest(_manifest(), "10.3.0", ORIN)
    with pytest.raises(ArtifactError) as e:
        check_engine_manifest(_manifest(), "10.7.0", ORIN)
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 10.3.0" in msg and "10.7.0" in msg and "sarloc build-engine" in msg
    with pytest.raises(ArtifactError, match=r"compute capability 8\.7.*H100 \(9\.0\)"):
        check_engine_manifest(_manifest(), "10.3.0", GpuInfo("H100", "9.0"))
    with pytest.raises(ArtifactError, match="same compute capability"):
        check_engine_manifest(_manifest(), "10.3.0", GpuInfo("Orin NX", "8.7"))
    check_engine_manifest(_manifest(), "10.3.0", GpuInfo("Orin NX", "8.7"), allow_other_gpu_model=True)
    assert "may run slowly" in caplog.text
    with pytest.raises(ArtifactError, match="not a sarloc engine"):
        check_engine_manifest(_manifest(kind="x"), "10.3.0", ORIN)


def test_tensorrt_missing_is_one_clean_line(monkeypatch, tiny_export, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(SarlocError) as e:
        import_tensorrt()
    assert "\n" not in str(e.value) and "pip install 'sarloc[gpu]'" in str(e.value) and "JetPack" in str(e.value)
    onnx = tiny_export / "sar_encoder.onnx"
    assert main(["build-engine", "--onnx", str(onnx), "--out", str(tmp_path / "e.engine")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sarloc[gpu]" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "e.engine").exists()


def test_cuda_binding_missing_is_one_clean_line(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SarlocError, match=r"cuda-python or pycuda.*sarloc\[gpu\]"):
        cuda_api(0)


# ----------------------------------------------------------------------------------------------
# a minimal fake of the TensorRT 10 Python API, recording what the builder is asked to do


def _fake_trt(version="10.3.0", fp16_flag=True):
    calls = {}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    members = {"TF32": 7, **({"FP16": 0, "INT8": 1} if fp16_flag else {})}
    BuilderFlag = enum.IntEnum("BuilderFlag", members)

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            import onnx

            calls["parsed"] = path
            g = onnx.load(path).graph
            self.network.inputs = [Tensor(i.name) for i in g.input]
            return True

        def get_error(self, i):
            return "no error"

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls["profile"] = (name, tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) or b"fresh-cache"

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            calls["flags"] = []
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag.name)

        def add_optimization_profile(self, profile):
            calls["profiles"] = calls.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            calls.setdefault("cache_in", []).append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return memoryview(b"PLAN:" + json.dumps(calls["flags"]).encode())

    for obj in (Logger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, OnnxParser, Builder):
        setattr(trt, obj.__name__, obj)
    return trt


def test_build_engine_against_fake_trt10(monkeypatch, tiny_export, tmp_path, caplog):
    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    trt = _fake_trt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache_dir = tmp_path / "cache"
    out = build_engine(d / "sar_encoder.onnx", fp16=True, batch_sizes=(1, 8, 32), timing_cache_dir=cache_dir, gpu=ORIN)
    assert out == d / "sar_encoder.fp16.engine" and out.read_bytes().startswith(b"PLAN:")
    man = read_engine_manifest(out)
    onnx_man = json.loads((d / "sar_encoder.json").read_text())
    c = onnx_man["input"]["shape"][1]
    assert trt.calls["profile"] == ("windows", (1, c, 64, 64), (8, c, 64, 64), (32, c, 64, 64))
    assert trt.calls["flags"] == ["FP16"] and trt.calls["network_flags"] == 0 and trt.calls["profiles"] == 1
    assert man["precision"] == "fp16" and man["builder_flags"] == ["FP16"] and not man["strongly_typed"]
    assert man["tensorrt_version"] == "10.3.0" and man["gpu_name"] == "Orin" and man["compute_capability"] == "8.7"
    assert man["parent_sha256"] == onnx_man["sha256"] == man["onnx"]["sha256"]
    assert man["profiles"] == [
        {"input": "windows", "min": [1, c, 64, 64], "opt": [8, c, 64, 64], "max": [32, c, 64, 64]}
    ]
    assert man["sha256"] == sha256_file(out) and man["embed_dim"] == onnx_man["embed_dim"]
    key = timing_cache_key("10.3.0", ORIN, onnx_man["sha256"], "fp16")
    cache = timing_cache_path(cache_dir, key)
    assert man["timing_cache"]["key"] == key and cache.read_bytes() == b"fresh-cache+tuned"
    assert trt.calls["cache_in"] == [b""]

    # the second build starts from the saved cache; a tampered cache is dropped with a warning
    build_engine(d / "sar_encoder.onnx", fp16=True, timing_cache_dir=cache_dir, gpu=ORIN)
    assert trt.calls["cache_in"][-1] == b"fresh-cache+tuned"
    cache.write_bytes(b"garbage")
    build_engine(d / "sar_encoder.onnx", fp16=True, timing_cache_dir=cache_dir, gpu=ORIN)
    assert trt.calls["cache_in"][-1] == b"" and "stale or corrupt" in caplog.text

    # FP32 without flags: strongly typed network
    out32 = build_engine(d / "sar_encoder.onnx", gpu=ORIN)
    assert out32.name == "sar_encoder.engine" and trt.calls["network_flags"] == 1 << 1 and trt.calls["flags"] == []

    # a modified engine is refused at load
    out32.write_bytes(b"PLAN:tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        read_engine_manifest(out32)


def test_build_engine_against_fake_trt11(monkeypatch, tiny_export, tmp_path):
    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    trt = _fake_trt("11.0.0", fp16_flag=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ArtifactError, match="no FP16 builder flag"):
        build_engine(d / "sar_encoder.onnx", fp16=True, gpu=ORIN)
    out = build_engine(d / "sar_encoder.onnx", gpu=ORIN)
    man = read_engine_manifest(out)
    assert man["strongly_typed"] and man["builder_flags"] == [] and man["tensorrt_version"] == "11.0.0"


def test_build_engine_refuses_modified_onnx(monkeypatch, tiny_export, tmp_path):
    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt())
    p = d / "sar_encoder.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="re-export"):
        build_engine(p, gpu=ORIN)


@pytest.mark.gpu
def test_real_engine_matches_onnx_runtime(tiny_export, tmp_path):
    """Needs TensorRT, a CUDA binding and a GPU: not run on this project's machines (see docs/export.md)."""
    pytest.importorskip("tensorrt")
    from sarloc.backends.encoders import OrtEncoder, TrtEncoder
    from sarloc.backends.tensorrt import current_gpu
    from sarloc.export.onnx import sample_windows

    try:
        current_gpu(0)
    except SarlocError as e:
        pytest.skip(str(e))
    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    ort_enc = OrtEncoder(d / "sar_encoder.onnx")
    x = sample_windows(None, 64, ort_enc.preprocess, n=40, seed=1)[0]["sar"]
    engine = build_engine(d / "sar_encoder.onnx", timing_cache_dir=tmp_path / "cache")
    with TrtEncoder(engine) as trt_enc:
        assert np.abs(trt_enc(x) - ort_enc(x)).max() < 1e-3  # 40 > max batch 32: split in two
