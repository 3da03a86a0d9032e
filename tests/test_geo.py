import numpy as np
import pytest

from sarloc.core.errors import SceneError
from sarloc.core.geo import GeoFrame, TileGrid, px_from_m, utm_epsg_for


def test_metric_frame_without_crs_is_east_north():
    f = GeoFrame(100, 50, gsd_m=(2.0, 3.0))
    x, y = f.pixel_to_metric(np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    assert np.allclose(x, [0, 20]) and np.allclose(y, [0, -30])
    assert f.metric_distance(0, 0, 3, 4).item() == pytest.approx(np.hypot(6, 12))
    with pytest.raises(SceneError, match="no geo-reference"):
        f.pixel_to_lonlat(0, 0)


def test_utm_frame_roundtrips_lonlat():
    f = GeoFrame(448, 448, crs="EPSG:32631", geotransform=(399940.0, 10.0, 0.0, 5100020.0, 0.0, -10.0))
    assert f.gsd_m == (10.0, 10.0)
    lon, lat = f.pixel_to_lonlat(224.0, 224.0)
    assert 1.0 < float(lon) < 3.5 and 45.0 < float(lat) < 47.0
    x, y = f.pixel_to_metric(1.0, 1.0)
    assert float(x) == pytest.approx(399950.0) and float(y) == pytest.approx(5100010.0)


def test_geographic_crs_is_not_square_in_metres():
    # 0.0001 deg pixels at 60 N: ~5.6 m east-west, ~11.1 m north-south
    f = GeoFrame(200, 200, crs="EPSG:4326", geotransform=(10.0, 1e-4, 0.0, 60.0, 0.0, -1e-4))
    gx, gy = f.gsd_m
    assert gx == pytest.approx(111320 * 1e-4 * np.cos(np.radians(60)), rel=0.02)
    assert gy == pytest.approx(11.13, rel=0.02)
    assert f.metric_crs == f"EPSG:{utm_epsg_for(10.01, 59.99)}"
    d = f.metric_distance(0, 0, 10, 0)
    assert float(d) == pytest.approx(10 * gx, rel=0.01)


def test_bad_crs_and_geotransform():
    with pytest.raises(SceneError, match="unknown crs"):
        GeoFrame(10, 10, crs="EPSG:999999", geotransform=(0, 1, 0, 0, 0, -1))
    with pytest.raises(SceneError, match="geotransform"):
        GeoFrame(10, 10, crs="EPSG:32631", geotransform=(0, 1, 0))


def test_tile_grid_and_containing():
    g = TileGrid(100, 80, 32, 16)
    assert (g.n_cols, g.n_rows) == (5, 4) and len(g) == 20
    o = g.origins()
    assert tuple(o[0]) == (0, 0) and tuple(o[1]) == (16, 0) and tuple(o[5]) == (0, 16)
    idx = g.containing(33.0, 5.0)
    assert set(idx.tolist()) == {1, 2}
    m = g.containing_mask(np.array([[33.0, 5.0], [0.5, 0.5]]))
    assert m.shape == (2, 20) and m[0].sum() == 2 and m[1].sum() == 1
    with pytest.raises(SceneError, match="larger than the scene"):
        TileGrid(30, 30, 64, 64)
    assert px_from_m(640, 10) == 64
