import json

import numpy as np
import pytest
from helpers import shared_scene, write_plain_scene

from sarloc.core.errors import SceneError
from sarloc.core.scene import find_scenes, load_scene, make_queries, normalise_optical, normalise_sar, read_image


def _arrays(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    opt = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    sar = rng.random((h, w)).astype(np.float32)
    return opt, sar


def test_load_plain_scene(tmp_path):
    opt, sar = _arrays()
    d = write_plain_scene(tmp_path / "s", opt, sar)
    s = load_scene(d)
    assert s.optical.shape == (96, 128, 3) and s.sar.shape == (96, 128, 1)
    assert s.optical.dtype == np.float32 and s.optical.max() <= 1.0
    assert s.sar_gray.max() <= 0.0  # linear power in (0,1] -> dB <= 0
    assert s.gsd_m == 5.0 and not s.frame.georeferenced
    assert find_scenes([tmp_path]) == [d]


def test_scales():
    assert normalise_optical(np.full((2, 2, 3), 5000, np.uint16), "reflectance_1e4").max() == pytest.approx(0.5)
    assert normalise_sar(np.full((2, 2), 0.1, np.float32), "linear_0_1").max() == pytest.approx(-10.0)
    assert normalise_sar(np.full((2, 2), -12.0, np.float32), "db").max() == pytest.approx(-12.0)
    assert normalise_sar(np.full((2, 2), 255, np.uint8), "display8").max() == pytest.approx(10.0)
    nan = np.array([[np.nan, 1.0], [1.0, 1.0]], np.float32)
    assert np.isfinite(normalise_sar(nan, "db")).all()
    with pytest.raises(SceneError, match="unknown scale"):
        normalise_sar(nan, "bogus")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: (d / "optical.png").unlink(), "optical image.*not found"),
        (lambda d: (d / "optical.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "could not be decoded"),
        (lambda d: (d / "sar.tif").write_bytes((d / "sar.tif").read_bytes()[:100]), "sar image.*could not be decoded"),
        (lambda d: (d / "scene.json").write_text("{not json"), "malformed JSON"),
        (lambda d: _edit(d, lambda m: m["sar"].update(scale="furlongs")), "sar.scale"),
        (lambda d: _edit(d, lambda m: m["sar"].update(bands=["VV", "VH"])), "has 1 bands but scene.json 'sar.bands'"),
        (lambda d: _edit(d, lambda m: m.pop("optical")), "field 'optical' is missing"),
        (lambda d: _edit(d, lambda m: m.update(crs="EPSG:32631")), "both be set or both be null"),
        (lambda d: _edit(d, lambda m: m.update(gsd_m_estimate=None)), "gsd_m"),
        (lambda d: (d / "sar.tif").write_bytes(b""), "empty"),
    ],
)
def test_bad_scene_inputs_give_one_line_errors(tmp_path, mutate, match):
    opt, sar = _arrays()
    d = write_plain_scene(tmp_path / "s", opt, sar)
    mutate(d)
    with pytest.raises(SceneError, match=match) as ei:
        load_scene(d)
    assert "\n" not in str(ei.value)


def _edit(d, fn):
    m = json.loads((d / "scene.json").read_text())
    fn(m)
    (d / "scene.json").write_text(json.dumps(m))


def test_size_mismatch(tmp_path):
    opt, _ = _arrays()
    d = write_plain_scene(tmp_path / "s", opt, np.ones((50, 50), np.float32))
    with pytest.raises(SceneError, match="one pixel grid"):
        load_scene(d)


def test_queries_and_window_too_large(tmp_path):
    opt, sar = _arrays()
    s = load_scene(write_plain_scene(tmp_path / "s", opt, sar))
    q = make_queries(s, "aligned", 32)
    assert len(q.origins) == 12 and q.centres[0].tolist() == [16.0, 16.0]
    qa = make_queries(s, "arbitrary", 32, n=50, seed=1)
    assert len(qa.origins) == 50
    assert (qa.origins[:, 0] + 32 <= 128).all() and (qa.origins[:, 1] + 32 <= 96).all()
    assert not np.array_equal(qa.origins, make_queries(s, "arbitrary", 32, n=50, seed=2).origins)
    with pytest.raises(SceneError, match="larger than the scene"):
        make_queries(s, "aligned", 200)


def test_change_mask_excludes_queries(tmp_path):
    import cv2

    opt, sar = _arrays()
    d = write_plain_scene(tmp_path / "s", opt, sar, {"change_mask": {"file": "cm.png", "meaning": "x"}})
    cm = np.zeros((96, 128), np.uint8)
    cm[:48, :64] = 255
    cv2.imwrite(str(d / "cm.png"), cm)
    s = load_scene(d)
    assert s.change_mask is not None and s.change_mask.sum() == 48 * 64
    q = make_queries(s, "aligned", 32)
    # tiles (0,0),(32,0) fully changed, (0,32),(32,32) half changed (> 0.25): all four dropped
    assert len(q.origins) == 12 - 4
    assert not any(x < 64 and y < 64 for x, y in q.origins.tolist())


def test_read_image_rejects_unknown_ext(tmp_path):
    p = tmp_path / "x.gif"
    p.write_bytes(b"GIF89a")
    with pytest.raises(SceneError, match="unsupported extension"):
        read_image(p)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name",
    [
        "france_s1s2",
        "china_shuguang",
        "europe_bigearthnet_29SND_56_35",
        "india_sih1733_1",
        "city_rift_demo",
        "china_gf3_osmnet_1",
    ],
)
def test_real_scenes_load(name):
    s = load_scene(shared_scene(name), verify_sha256=True)
    assert s.optical.shape[:2] == s.sar.shape[:2]
    assert np.isfinite(s.sar_gray).all() and np.isfinite(s.optical_gray).all()
    if s.frame.georeferenced:
        lon, lat = s.frame.pixel_to_lonlat(0.5, 0.5)
        assert -180 <= float(lon) <= 180 and -90 <= float(lat) <= 90


def test_pixels_beyond_float32_are_replaced_by_a_finite_mean():
    """Regression (exploring fuzz run): float64 pixels near the float32 maximum became inf on the cast, and the
    float32 mean that replaces them overflowed too, so a strip decoded with an inf pixel."""
    raw = np.array([[1.70141178e38, 1.70141168e38, 3.40282357e38]])  # the last one rounds to inf in float32
    for out in (normalise_sar(raw, "linear_0_1"), normalise_sar(raw, "db"), normalise_optical(raw, "linear_0_1")):
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_a_file_given_as_the_scene_folder_is_named_as_such(tmp_path):
    from sarloc.core.scene import load_scene

    f = tmp_path / "optical.tif"
    f.write_bytes(b"x")
    with pytest.raises(SceneError, match=r"is a file: give the scene folder that holds scene.json"):
        load_scene(f)
