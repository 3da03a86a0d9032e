"""Property-based fuzzing of the parsers (part 4; shared machinery in ``fuzz_common.py``, rule in docs/reliability.md):
run configs (TOML), verifier / shortlister / refiner manifests.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from fuzz_common import (
    DEMO,
    HUGE_INT_TEXT,
    ROOT,
    TINY_ONNX,
    fuzz,
    json_text_damage,
    json_value,
    json_value_huge,
    mutated,
    outcome,
    quiet_opencv,  # noqa: F401  (module fixture)
    small_max_pixels,  # noqa: F401  (module fixture)
    to_json_text,
    work_fixture,  # noqa: F401  (module fixture)
    write,
)
from hypothesis import given
from hypothesis import strategies as st

from sarloc.core.errors import SarlocError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# ================================================================================================ 6. configs

ONBOARD_TOML = (ROOT / "examples" / "onboard.toml").read_text()


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_literal(x)}" for k, x in v.items()) + "}"
    return '""'


toml_values = st.one_of(
    json_value.filter(lambda v: v is not None).map(_toml_literal),
    st.sampled_from(
        [
            HUGE_INT_TEXT,
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "0x_ff",
            "1__0",
            "'''multi\nline'''",
            "[" * 3000 + "]" * 3000,
            "{a = {b = {c = 1}}}",
            '"\\u00e9"',
        ]
    ),
)
toml_keys = st.one_of(
    st.sampled_from(
        [
            "source",
            "export",
            "pack",
            "out",
            "backend",
            "precision",
            "stride_px",
            "prior_radius_m",
            "follow",
            "resume",
            "max_strips",
            "mavlink",
            "queue_blocks",
            "localizer",
            "fusion",
            "k",
            "threshold",
            "url",
            "baud",
            "enabled",
            "gps_rate_hz",
            "source_system",
            "flavour",
            "signing_key_file",
            "dialect",
            '"a.b"',
        ]
    ),
    st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
)


@st.composite
def toml_texts(draw) -> str:
    lines = ONBOARD_TOML.splitlines()
    kind = draw(st.sampled_from(["lines", "lines", "lines", "cut", "text", "section"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "cut":
        return ONBOARD_TOML[: draw(st.integers(0, len(ONBOARD_TOML)))]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "value", "value", "delete", "insert", "dup"]))
        if op == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + draw(toml_values)
        elif op == "delete":
            del lines[i]
        elif op == "insert":
            lines.insert(i, f"{draw(toml_keys)} = {draw(toml_values)}")
        elif op == "dup":
            lines.insert(i, lines[i])
        if not lines:
            lines = [""]
    if kind == "section":
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["[mavlink]", "[fusion]", "[[x]]", "[a"])))
    return "\n".join(lines) + "\n"


@fuzz(1000)
@given(text=toml_texts())
def test_load_run_config_fuzzed_toml(work, text):
    from sarloc.runtime.daemon import RunConfig, load_run_config

    p = write(work / "run.toml", text)
    cfg = outcome("configs: daemon.load_run_config", lambda: load_run_config(p))
    if cfg is not None and not isinstance(cfg, SarlocError):
        assert isinstance(cfg, RunConfig)


# ======================================================================= 7. verifier / shortlister / refiner

VERIFIER_JSON = json.loads((DEMO / "verifier.json").read_text())
SHORTLISTER_JSON = json.loads((DEMO / "shortlister.json").read_text())


def _check_verifier(v: Any) -> None:
    from sarloc.runtime.refine import Verifier

    if isinstance(v, Verifier):
        v.prob(np.zeros((2, len(v.FEATURES))))  # usable
        assert np.isfinite(v.std).all() and (v.std > 0).all() and np.isfinite(v.radius_px) and v.radius_px > 0


@fuzz(1000)
@given(data=st.data())
def test_verifier_and_shortlister_load(work, data):
    from sarloc.runtime.refine import Shortlister, Verifier

    cls, base = data.draw(st.sampled_from([(Verifier, VERIFIER_JSON), (Shortlister, SHORTLISTER_JSON)]))
    kind = data.draw(st.sampled_from(["mutated", "mutated", "mutated", "field", "text", "json"]))
    if kind == "text":
        text: str | bytes = data.draw(json_text_damage(json.dumps(base)))
    elif kind == "json":
        text = to_json_text(data.draw(json_value_huge))
    else:
        m = data.draw(mutated(base))
        if kind == "field":
            key = data.draw(st.sampled_from(["weights", "mean", "std", "radius_px", "meta"]))
            m[key] = data.draw(
                st.one_of(
                    json_value,
                    st.lists(st.one_of(st.floats(), st.integers(-(2**70), 2**70)), min_size=4, max_size=7),
                )
            )
        text = to_json_text(m)
    p = write(work / "verifier.json", text)
    _check_verifier(outcome("verifier/shortlister: Verifier.load / Shortlister.load", lambda: cls.load(p)))


REFINER_JSON = json.loads((DEMO / "refiner.json").read_text())


@fuzz(1000)
@given(data=st.data())
def test_onnx_refiner_manifest(work, data):
    from sarloc.core.artifacts import sha256_bytes
    from sarloc.runtime.refine import OnnxRefiner

    model = TINY_ONNX
    if data.draw(st.integers(0, 3)) == 0:
        b = bytearray(TINY_ONNX)
        del b[data.draw(st.integers(0, len(b) - 1)) :]
        model = bytes(b)
    base = {**REFINER_JSON, "sha256": sha256_bytes(model)}
    kind = data.draw(st.sampled_from(["mutated", "mutated", "text", "valid"]))
    if kind == "text":
        text: str | bytes = data.draw(json_text_damage(json.dumps(base)))
    elif kind == "valid":
        text = json.dumps(base)
    else:
        text = to_json_text(data.draw(mutated(base, 4)))
    d = work / "refiner"
    d.mkdir(exist_ok=True)
    write(d / "refiner.onnx", model)
    write(d / "refiner.json", text)
    r = outcome("refiner: OnnxRefiner (manifest + model)", lambda: OnnxRefiner(d / "refiner.onnx"))
    if isinstance(r, OnnxRefiner):
        assert r.k > 0
