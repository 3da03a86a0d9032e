"""Property-based fuzzing of the parsers (part 6): regressions of bugs found elsewhere, and the case-count summary.

The fuzz tests live in ``tests/test_fuzz_parsers_*.py`` (run in file order; this module is the last of them and
runs after ``tests/test_fuzz_artifacts.py`` too) and share the counters of ``fuzz_common.py``.
``pytest -s tests/test_fuzz_parsers_*.py`` prints the cases each parser ran (the last test); when every test of the
``test_fuzz_parsers_*.py`` modules was selected, it checks that each parser reached ``MIN_CASES``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from fuzz_common import (
    ACCEPTED,
    CASES,
    HUGE_INT_TEXT,
    KNOWN,
    MIN_CASES,
    SCENE_GEO,
    TINY_MAN,
    TINY_ONNX,
    _write_scene_images,
    quiet_opencv,  # noqa: F401  (module fixture)
    small_max_pixels,  # noqa: F401  (module fixture)
    work_fixture,  # noqa: F401  (module fixture)
    write,
)

from sarloc.core.scene import load_scene

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# ===================================================================== bugs found elsewhere, fixed (regressions)


def test_fixed_bug_run_config_huge_int(tmp_path):
    from sarloc.core.errors import ConfigError
    from sarloc.runtime.daemon import load_run_config

    text = f'source = "a"\nexport = "b"\npack = "c"\nqueue_blocks = {HUGE_INT_TEXT}\n'
    with pytest.raises(ConfigError):
        load_run_config(write(tmp_path / "c.toml", text))


def test_fixed_bug_run_config_deep_nesting(tmp_path):
    from sarloc.core.errors import ConfigError
    from sarloc.runtime.daemon import load_run_config

    text = 'source = "a"\nexport = "b"\npack = "c"\nx = ' + "[" * 3000 + "]" * 3000 + "\n"
    with pytest.raises(ConfigError):
        load_run_config(write(tmp_path / "c.toml", text))


def test_fixed_bug_run_config_string_stride(tmp_path):
    from sarloc.core.errors import ConfigError
    from sarloc.runtime.daemon import load_run_config

    with pytest.raises(ConfigError):
        load_run_config(write(tmp_path / "c.toml", 'source = "a"\nexport = "b"\npack = "c"\nstride_px = "32"\n'))


def test_fixed_bug_model_manifest_int_sha256(tmp_path):
    from sarloc.backends.encoders import OrtEncoder
    from sarloc.core.errors import ArtifactError

    write(tmp_path / "m.onnx", TINY_ONNX)
    write(tmp_path / "m.json", json.dumps({**TINY_MAN, "sha256": 1}))
    with pytest.raises(ArtifactError):
        OrtEncoder(tmp_path / "m.onnx")


def test_fixed_bug_scene_crs_without_lonlat_transform(tmp_path):
    from sarloc.core.errors import SceneError

    _write_scene_images(tmp_path)
    write(tmp_path / "scene.json", json.dumps({**SCENE_GEO, "crs": "IAU_2015:30100"}))
    with pytest.raises(SceneError):
        load_scene(tmp_path)


# ================================================================================================== summary


def _is_test(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and node.name.startswith("test_")


def test_zz_case_counts(request):
    """Print the cases each parser ran (``pytest -s``); with the whole module run, each reached MIN_CASES."""
    if not CASES:
        pytest.skip("no fuzz test ran in this session")
    width = max(map(len, CASES))
    print(f"\n  {'fuzz cases per parser':<{width}}  {'cases':>6}  {'accepted':>8}")
    for name, n in sorted(CASES.items()):
        print(f"  {name:<{width}}  {n:>6}  {ACCEPTED[name]:>8}")
    print(f"  {'total':<{width}}  {sum(CASES.values()):>6}")
    for name, n in sorted(KNOWN.items()):
        print(f"  known bug (other file) hit: {name}: {n}")
    files = sorted(Path(__file__).parent.glob("test_fuzz_parsers_*.py"))
    defined = {n.name for p in files for n in ast.parse(p.read_text()).body if _is_test(n)}
    ran = {i.originalname for i in request.session.items if i.path in files}
    if ran >= defined:  # every test of the test_fuzz_parsers_*.py modules was selected
        low = {k: v for k, v in CASES.items() if v < MIN_CASES}
        assert not low, f"parsers below {MIN_CASES} cases: {low}"
