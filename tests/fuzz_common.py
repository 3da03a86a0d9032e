"""Shared machinery of the parser fuzz tests (``tests/test_fuzz_parsers_*.py``, ``tests/test_fuzz_artifacts.py``).

Case counters (``CASES``, ``ACCEPTED``, ``KNOWN``), Hypothesis settings (``fuzz``), the per-case deadline and
``outcome`` rule, module fixtures, strategies and tiny valid artefacts. The counters live here, so every fuzz
module adds to the same totals; ``test_fuzz_parsers_9_summary.py`` prints and checks them (see its docstring and
docs/reliability.md).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sarloc.core.scene as scene_mod
from sarloc.core.errors import SarlocError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sarloc" / "demo_model"
CASE_TIMEOUT_S = 10.0  # one case running longer than this is a hang
MIN_CASES = 1000
FUZZ_SCALE = max(1, int(os.environ.get("SARLOC_FUZZ_SCALE", "1")))


#: cases run per parser (printed by the last test; docs/reliability.md records them)
CASES: collections.Counter[str] = collections.Counter()
#: cases whose input was accepted (the rest ended in a SarlocError or a counted drop)
ACCEPTED: collections.Counter[str] = collections.Counter()
#: hits of known bugs in files this suite does not own (tolerated, see the xfail tests at the end)
KNOWN: collections.Counter[str] = collections.Counter()


def fuzz(n: int):
    """Hypothesis settings of one fuzz test: ``n`` cases (times ``SARLOC_FUZZ_SCALE``), no per-case deadline
    (SIGALRM guards hangs). Derandomised or not by the profile that tests/conftest.py loads."""
    return settings(
        max_examples=n * FUZZ_SCALE,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


class CaseTimeout(BaseException):
    """A case ran past CASE_TIMEOUT_S (a BaseException, so that parsers' ``except Exception`` cannot hide it)."""


@contextlib.contextmanager
def time_limit(seconds: float = CASE_TIMEOUT_S):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(parser: str, fn, *, known: tuple[type[BaseException], ...] = (), known_key: str = ""):
    """Run one case: return the result or the (one-line) SarlocError; any other exception fails the test.

    ``known``: exception types of an open bug in a file this suite does not own, tolerated and counted.
    """
    CASES[parser] += 1
    with time_limit():
        try:
            r = fn()
            ACCEPTED[parser] += 1
            return r
        except SarlocError as e:
            msg = str(e)
            assert msg.strip(), f"{type(e).__name__} with an empty message"
            assert "\n" not in msg and "\r" not in msg, f"{type(e).__name__} message is not one line: {msg!r}"
            return e
        except known:
            KNOWN[known_key] += 1
            return None


def write(path: Path, data: bytes | str) -> Path:
    """Replace ``path`` with a new file (unlink first: a memory map of the old file stays valid)."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module", name="work")
def work_fixture(tmp_path_factory) -> Path:
    """A module temporary folder (import ``work_fixture`` into a test module to get ``work``)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def quiet_opencv():
    """Autouse where imported. OpenCV logs every undecodable image to stderr; silence it while fuzzing."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    yield
    cv2.utils.logging.setLogLevel(level)


@pytest.fixture(scope="module", autouse=True)
def small_max_pixels():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scene_mod, "MAX_PIXELS", 1 << 16)  # a corrupt header cannot make a case allocate gigabytes
        yield


# ============================================================================================ shared strategies

HUGE_INT_TEXT = "1" * 5000  # more digits than Python's int() accepts from text (4300)
INTERESTING = [
    0,
    -1,
    1,
    2**63,
    -(2**63) - 1,
    10**30,
    10**400,  # parses from JSON and TOML, but is beyond the float range (math.isfinite raises OverflowError)
    1e308,
    -1e308,
    5e-324,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    "EPSG:4326",
    "EPSG:999999",
    "+proj=nonsense",
    "../../etc/passwd",
    "a" * 300,
    "x\x00y",
    "line\nbreak.png",
    "\udcff",
    True,
    False,
    [],
    {},
    [1.0, 2.0],
    [float("nan")] * 6,
    ["a"] * 6,
]
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(INTERESTING).map(copy.deepcopy),  # a fresh copy: mutated() may append to it
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated(draw, base: Any, max_ops: int = 3) -> Any:
    """``base`` (a JSON-like dict) with 1..max_ops fields deleted, replaced by random values, or keys added."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(obj)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(obj, path[:-1]), path[-1]
        op = draw(st.sampled_from(["delete", "replace", "replace", "replace", "add"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_value)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_value)
        else:
            parent.append(draw(json_value))
    return obj


def to_json_text(obj: Any) -> str:
    """JSON text of ``obj`` (NaN/Infinity tokens allowed; the string "HUGE" becomes a 5000-digit integer)."""
    return json.dumps(obj, ensure_ascii=False).replace('"HUGE"', HUGE_INT_TEXT)


json_value_huge = st.one_of(json_value, st.just("HUGE"))


@st.composite
def cut_or_flipped(draw, data: bytes, kind: str, max_flips: int = 4) -> bytes:
    """``data`` cut at a random byte (``kind="cut"``) or with 1..max_flips bytes overwritten (``"flip"``)."""
    if kind == "cut" or not data:
        return data[: draw(st.integers(0, len(data)))]
    b = bytearray(data)
    for _ in range(draw(st.integers(1, max_flips))):
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return bytes(b)


@st.composite
def json_text_damage(draw, text: str) -> bytes:
    """Raw damage to a valid JSON document: truncation, byte flips, invalid UTF-8, deep nesting, huge numbers."""
    data = text.encode("utf-8", "surrogatepass")
    kind = draw(st.sampled_from(["cut", "flip", "utf8", "deep", "huge", "bytes"]))
    if kind in ("cut", "flip"):
        return draw(cut_or_flipped(data, kind))
    if kind == "utf8":
        i = draw(st.integers(0, len(data)))
        return data[:i] + b"\xff\xfe\xc3" + data[i:]
    if kind == "deep":
        n = draw(st.sampled_from([100, 5000, 100_000]))
        return b"[" * n + b"]" * n
    if kind == "huge":
        return draw(st.sampled_from([HUGE_INT_TEXT, "-" + HUGE_INT_TEXT, "1e999999", "-1e999999"])).encode()
    return draw(st.binary(max_size=300))


# ================================================================= artefacts shared by several modules


def _encode(ext: str, arr: np.ndarray, **kw: Any) -> bytes:
    if ext in (".tif", ".tiff"):
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, **kw)
        return buf.getvalue()
    if ext == ".npy":
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    ok, enc = cv2.imencode(ext, arr)
    assert ok, f"cv2 cannot encode {arr.dtype} {arr.shape} as {ext}"
    return enc.tobytes()


@st.composite
def damaged_seed(draw, seeds: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """A valid tiny file cut at a random byte, or with a few bytes overwritten (or both)."""
    ext, data = draw(st.sampled_from(seeds))
    b = bytearray(data)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 6))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) or b == bytearray(data):
        del b[draw(st.integers(0, len(b) - 1)) :]
    return ext, bytes(b)


ARRAY_DTYPES = [
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "bool",
]


@st.composite
def odd_arrays(draw, max_dims: int = 4) -> np.ndarray:
    """Small arrays of odd dtypes and shapes (1-D..4-D, too many bands), NaN/Inf included for floats."""
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    ndim = draw(st.sampled_from([d for d in (1, 2, 2, 2, 3, 3, 4) if d <= max_dims]))  # mostly images
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    return draw(hnp.arrays(dtype, shape))


def _write_scene_images(folder: Path) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "optical.png"), rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    tifffile.imwrite(folder / "sar.tif", rng.random((8, 8)).astype(np.float32))
    cv2.imwrite(str(folder / "change_mask.png"), (rng.random((8, 8)) > 0.8).astype(np.uint8) * 255)
    cv2.imwrite(str(folder / "small.png"), rng.integers(0, 255, (4, 4), dtype=np.uint8))


SCENE_PLAIN = {
    "name": "fuzz",
    "optical": {"file": "optical.png", "bands": ["R", "G", "B"], "scale": "display8"},
    "sar": {"file": "sar.tif", "bands": ["VV"], "scale": "linear_0_1"},
    "change_mask": {"file": "change_mask.png"},
    "crs": None,
    "geotransform": None,
    "gsd_m": None,
    "gsd_m_estimate": 5.0,
}
SCENE_GEO = {
    **SCENE_PLAIN,
    "crs": "EPSG:32631",
    "geotransform": [500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0],
    "gsd_m": [10.0, 10.0],
}
SCENE_LONLAT = {**SCENE_GEO, "crs": "EPSG:4326", "geotransform": [2.0, 1e-4, 0.0, 48.0, 0.0, -1e-4], "gsd_m": None}


def _tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("windows", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 64])
    g = helper.make_graph([helper.make_node("Flatten", ["windows"], ["embeddings"], axis=1)], "tiny", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m.SerializeToString()


TINY_ONNX = _tiny_onnx()


def _tiny_manifest(model: bytes) -> dict[str, Any]:
    from sarloc.core.artifacts import sha256_bytes

    man = json.loads((DEMO / "sar_encoder.json").read_text())
    man.update(sha256=sha256_bytes(model), embed_dim=64, window_px=8, file="m.onnx")
    man["input"]["shape"] = ["batch", 1, 8, 8]
    man["output"]["shape"] = ["batch", 64]
    man["preprocess"] = {"n_orient": 0, "clip_sigma": 4.0, "grad_sigma": 0.8, "eps_rel": 0.3}
    return man


TINY_MAN = _tiny_manifest(TINY_ONNX)
ONNX_PARSER = "ONNX models: OrtEncoder (model bytes)"
