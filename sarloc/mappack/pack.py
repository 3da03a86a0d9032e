"""Map pack format, loading and verification (torch-free, numpy only at import).

A map pack is a folder::

    PACK/pack.json          manifest (kind sarloc.map-pack): encoder hashes, tile geometry, CRS, counts,
                            embedding dim/dtype, sha256 of every file below
    PACK/embeddings.npy     (N, D) float16 unit-norm tile embeddings, row i = tile i
    PACK/tiles.npy          (N,) structured tile table, TILE_DTYPE (no pickles)
    PACK/ivf_*.npy          optional approximate index (see sarloc.mappack.ann)

Both matrices are opened with ``np.load(mmap_mode="r")``: the pack is never copied into memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import load_npy, read_json, sha256_file, verify_files
from sarloc.core.errors import ArtifactError

logger = logging.getLogger(__name__)

PACK_KIND = "sarloc.map-pack"
PACK_SCHEMA = 1
MANIFEST_NAME = "pack.json"
EMBEDDINGS_NAME = "embeddings.npy"
TILES_NAME = "tiles.npy"
BASEMAP_NAME = "basemap.npy"  # float16 luminance on the pack grid (metric refinement); packs before 0.2 lack it

TILE_DTYPE = np.dtype(
    [
        ("row", "<i4"),  # tile-grid row
        ("col", "<i4"),  # tile-grid column
        ("x_m", "<f8"),  # centre easting in the pack's metric CRS
        ("y_m", "<f8"),  # centre northing
        ("lat_deg", "<f8"),  # centre latitude (NaN without geo-reference)
        ("lon_deg", "<f8"),  # centre longitude
        ("valid_frac", "<f4"),  # fraction of valid (not nodata) pixels in the tile
    ]
)


def _load_npy(path: Path, what: str) -> np.ndarray:
    """``np.load(mmap_mode="r")`` with one-line errors for missing, truncated or pickled files."""
    return load_npy(path, f"map pack {what}", "rebuild the pack with `sarloc map build`")


_GRID_INTS = ("tile_px", "stride_px", "n_rows", "n_cols")
_GRID_FLOATS = ("gsd_m", "tile_m", "stride_m")


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_pos(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def _check_manifest_fields(man: dict[str, Any], where: Path) -> None:
    """Types of the manifest fields the loader and the runtime read (one ArtifactError naming the first bad one)."""

    def bad(field: str, want: str) -> ArtifactError:
        return ArtifactError(f"{where}: field {field!r} must be {want}; rebuild the pack with `sarloc map build`")

    for key in ("encoder", "grid", "tiles", "embeddings", "files"):
        if not isinstance(man[key], dict):
            raise bad(key, "an object")
    g, t, e = man["grid"], man["tiles"], man["embeddings"]
    for key in _GRID_INTS:
        if not _is_int(g.get(key), 1):
            raise bad(f"grid.{key}", "a positive integer")
    for key in _GRID_FLOATS:
        if not _is_pos(g.get(key)):
            raise bad(f"grid.{key}", "a positive number")
    if "metric_crs" not in g or not isinstance(g["metric_crs"], (str, type(None))):
        raise bad("grid.metric_crs", "a CRS string or null")
    if not _is_int(t.get("count"), 0):
        raise bad("tiles.count", "a non-negative integer")
    if not _is_int(e.get("dim"), 1) or not isinstance(e.get("dtype"), str):
        raise bad("embeddings", "{dim: positive integer, dtype: string}")
    for name, sha in man["files"].items():
        if not (_is_pack_file_name(name) and isinstance(sha, str)):
            raise bad("files", "{file name in the pack folder: sha256 string}")


def _is_pack_file_name(name: Any) -> bool:
    """A plain file name directly in the pack folder: printable, no folder part, not ``.``/``..``, and short enough
    for any file system (255 bytes), so that opening or stat-ing it can only find or miss the file."""
    return (
        isinstance(name, str)
        and name.isprintable()
        and Path(name).name == name
        and name not in (".", "..")
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )


def read_pack_manifest(pack_dir: str | Path) -> dict[str, Any]:
    """Read and check ``PACK/pack.json`` (kind, schema, required fields).

    Raises:
        ArtifactError: missing, malformed, of another kind or of a newer schema.
    """
    pack_dir = Path(pack_dir)
    man = read_json(pack_dir / MANIFEST_NAME, "map pack manifest")
    if man.get("kind") != PACK_KIND:
        raise ArtifactError(f"{pack_dir / MANIFEST_NAME} is not a sarloc map pack manifest (kind {man.get('kind')!r})")
    if man.get("pack_schema") != PACK_SCHEMA:
        raise ArtifactError(
            f"{pack_dir / MANIFEST_NAME} has pack schema {man.get('pack_schema')}, this sarloc reads {PACK_SCHEMA}; "
            "rebuild the pack with this version"
        )
    for key in ("encoder", "grid", "tiles", "embeddings", "files"):
        if key not in man:
            raise ArtifactError(f"{pack_dir / MANIFEST_NAME} lacks field {key!r}; rebuild the pack")
    _check_manifest_fields(man, pack_dir / MANIFEST_NAME)
    return man


def pack_sha256(pack_dir: str | Path) -> str:
    """A pack's identity: the sha256 of its manifest ``PACK/pack.json`` (which names the sha256 of every other file).

    Raises:
        ArtifactError: the manifest is missing or unreadable.
    """
    p = Path(pack_dir) / MANIFEST_NAME
    try:
        return sha256_file(p)
    except OSError as e:
        raise ArtifactError(f"map pack manifest {p} cannot be read ({e.strerror or e}); rebuild the pack") from None


def verify_map_pack(pack_dir: str | Path) -> dict[str, Any]:
    """Check every file of a pack against the sha256 in its manifest, and the matrices' shapes.

    Returns:
        The manifest.

    Raises:
        ArtifactError: a file missing, modified or truncated (one line naming it).
    """
    pack_dir = Path(pack_dir)
    man = read_pack_manifest(pack_dir)
    verify_files(pack_dir, man["files"], "map pack")
    MapPack(pack_dir, verify=False)  # shapes, dtypes, counts
    return man


@dataclass
class MapPack:
    """An opened map pack: memory-mapped embeddings and tile table plus the manifest.

    Args:
        path: the pack folder.
        verify: check every file's sha256 first (reads every byte; ``sarloc map verify`` does this).
        sar_manifest: manifest of the SAR encoder that will query the pack (e.g. ``OrtEncoder.manifest``);
            a pack built with an optical encoder from another export (checkpoint) is refused.

    Raises:
        ArtifactError: missing/corrupt/truncated files, inconsistent shapes, or an encoder mismatch.
    """

    path: Path
    verify: bool = False
    sar_manifest: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(init=False)
    manifest_sha256: str = field(init=False)
    embeddings: np.ndarray = field(init=False, repr=False)
    tiles: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.manifest = verify_map_pack(self.path) if self.verify else read_pack_manifest(self.path)
        # the pack's identity: its manifest holds the sha256 of every other file (run records and replay use it)
        self.manifest_sha256 = pack_sha256(self.path)
        emb = _load_npy(self.path / EMBEDDINGS_NAME, "embeddings")
        tiles = _load_npy(self.path / TILES_NAME, "tile table")
        e = self.manifest["embeddings"]
        n = int(self.manifest["tiles"]["count"])
        if emb.ndim != 2 or emb.shape != (n, int(e["dim"])) or str(emb.dtype) != e["dtype"]:
            raise ArtifactError(
                f"{self.path / EMBEDDINGS_NAME} is {emb.dtype} {emb.shape}, the manifest says {e['dtype']} "
                f"({n}, {e['dim']}); rebuild the pack"
            )
        if tiles.dtype != TILE_DTYPE or tiles.shape != (n,):
            raise ArtifactError(
                f"{self.path / TILES_NAME} is {tiles.dtype} {tiles.shape}, expected the tile table of {n} tiles; "
                "rebuild the pack"
            )
        self.embeddings, self.tiles = emb, tiles
        if self.sar_manifest is not None:
            check_encoder_match(self.manifest, self.sar_manifest, self.path)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        """Embedding size D."""
        return int(self.embeddings.shape[1])

    @property
    def grid(self) -> dict[str, Any]:
        """Tile geometry: metric CRS, gsd_m, tile_px/stride_px, tile_m/stride_m, grid origin and size."""
        return dict(self.manifest["grid"])

    @property
    def tile_m(self) -> float:
        """Tile side on the ground, metres."""
        return float(self.manifest["grid"]["tile_m"])

    @property
    def metric_crs(self) -> str | None:
        """The metric CRS of the tile centres (None: local metres of a scene without geo-reference)."""
        return self.manifest["grid"]["metric_crs"]

    def centres_m(self) -> np.ndarray:
        """(N, 2) float64 tile centres (easting, northing), metres (a copy, 16 bytes per tile)."""
        return np.stack([self.tiles["x_m"], self.tiles["y_m"]], axis=1)

    def metric_grid(self):
        """The pack's pixel grid (:class:`~sarloc.mappack.basemap.MetricGrid`): pixel <-> metric."""
        from sarloc.mappack.basemap import MetricGrid

        g = self.manifest["grid"]
        return MetricGrid(g["metric_crs"], g["x0_m"], g["y0_m"], g["gsd_m"], g["width_px"], g["height_px"])

    def tile_centres_px(self, rows: np.ndarray) -> np.ndarray:
        """(N, 2) pixel centres (col, row) on the pack grid of the given tile rows."""
        g = self.manifest["grid"]
        t = self.tiles[np.asarray(rows)]
        half = g["tile_px"] / 2.0
        return np.stack([t["col"] * g["stride_px"] + half, t["row"] * g["stride_px"] + half], axis=1).astype(float)

    def basemap(self) -> np.ndarray | None:
        """The basemap luminance on the pack grid (memory-mapped float16), or None for a pack without it."""
        p = self.path / BASEMAP_NAME
        if not p.is_file():
            return None
        arr = _load_npy(p, "basemap image")
        g = self.manifest["grid"]
        if arr.shape != (g["height_px"], g["width_px"]):
            raise ArtifactError(f"{p} is {arr.shape}, the pack grid is {g['height_px']}x{g['width_px']}; rebuild")
        return arr

    def to_metric(self, lon_deg: float, lat_deg: float) -> tuple[float, float]:
        """(lon, lat) -> (easting, northing) in the pack's metric CRS."""
        if self.metric_crs is None:
            raise ArtifactError(f"map pack {self.path} has no geo-reference: give positions in its metric frame")
        import pyproj

        tr = pyproj.Transformer.from_crs("EPSG:4326", self.metric_crs, always_xy=True)
        x, y = tr.transform(lon_deg, lat_deg)
        return float(x), float(y)


def check_encoder_match(pack_manifest: dict[str, Any], sar_manifest: dict[str, Any], pack_path: Path) -> None:
    """Refuse a pack whose embeddings come from another export than the SAR encoder (one line with the fix).

    Both encoders of one export share the parent checkpoint's sha256 (``checkpoint_sha256``); the preprocessing,
    window and embedding size must agree too.
    """
    enc = pack_manifest["encoder"]
    want = sar_manifest.get("checkpoint_sha256")
    have = enc.get("checkpoint_sha256")
    if not want or want != have:
        raise ArtifactError(
            f"map pack {pack_path} was built with the encoder of checkpoint {str(have)[:12]}, the SAR encoder comes "
            f"from checkpoint {str(want)[:12]}; rebuild the pack with that export's optical encoder "
            "(`sarloc map build --export EXPORT ...`)"
        )
    for key in ("embed_dim", "window_px", "preprocess"):
        if sar_manifest.get(key) != enc.get(key):
            raise ArtifactError(
                f"map pack {pack_path}: encoder {key} {enc.get(key)} differs from the SAR encoder's "
                f"{sar_manifest.get(key)}; rebuild the pack with the matching export"
            )


def pack_info(pack_dir: str | Path) -> dict[str, Any]:
    """A short summary of a pack (manifest fields plus on-disk sizes) without reading the matrices."""
    pack_dir = Path(pack_dir)
    man = read_pack_manifest(pack_dir)
    sizes = {name: (pack_dir / name).stat().st_size for name in man["files"] if (pack_dir / name).is_file()}
    g, t, enc = man["grid"], man["tiles"], man["encoder"]
    src, ann = man.get("source"), man.get("ann")
    return {
        "path": str(pack_dir),
        "source": src.get("path") if isinstance(src, dict) else None,
        "metric_crs": g["metric_crs"],
        "gsd_m": g["gsd_m"],
        "tile": f"{g['tile_px']} px = {g['tile_m']:g} m, stride {g['stride_px']} px = {g['stride_m']:g} m",
        "grid": f"{g['n_rows']} x {g['n_cols']} tiles",
        "tiles": t["count"],
        "skipped_nodata": t.get("skipped"),
        "embedding": f"{man['embeddings']['dim']}-D {man['embeddings']['dtype']}",
        "encoder_onnx_sha256": enc.get("sha256"),
        "checkpoint_sha256": enc.get("checkpoint_sha256"),
        "ann": ann.get("kind") if isinstance(ann, dict) else None,
        "bytes": int(sum(sizes.values())),
    }


def pack_footprint(pack_dir: str | Path, points_per_edge: int = 16) -> dict[str, Any]:
    """The extent of a pack's metric grid as a GeoJSON FeatureCollection of one Polygon (RFC 7946: WGS 84 lon/lat).

    The ring runs counter-clockwise from the south-west corner, each edge densified to ``points_per_edge``
    segments (a straight edge of a projected grid is curved in lon/lat), and is closed. Tiles skipped as nodata are
    not cut out: this is the grid the pack covers.

    Raises:
        ArtifactError: the pack has no geo-reference (``grid.metric_crs`` null), or its grid fields are malformed.
    """
    import math

    pack_dir = Path(pack_dir)
    man = read_pack_manifest(pack_dir)
    g = man["grid"]
    crs = g["metric_crs"]
    if crs is None:
        raise ArtifactError(
            f"map pack {pack_dir} has no geo-reference (grid.metric_crs is null: built from a scene without CRS), "
            "so it has no lon/lat footprint"
        )
    x0, y0 = g.get("x0_m"), g.get("y0_m")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (x0, y0)):
        raise ArtifactError(f"{pack_dir / MANIFEST_NAME}: grid.x0_m / y0_m must be finite numbers; rebuild the pack")
    if not (_is_int(g.get("width_px"), 1) and _is_int(g.get("height_px"), 1)):
        raise ArtifactError(f"{pack_dir / MANIFEST_NAME}: grid.width_px / height_px must be positive integers")
    import pyproj

    x1, y1 = x0 + g["width_px"] * g["gsd_m"], y0 - g["height_px"] * g["gsd_m"]  # y0 is the top (north) edge
    corners = [(x0, y1), (x1, y1), (x1, y0), (x0, y0)]  # SW, SE, NE, NW: counter-clockwise
    n = max(int(points_per_edge), 1)
    xs, ys = [], []
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1], strict=True):
        f = np.arange(n) / n
        xs.append(ax + f * (bx - ax))
        ys.append(ay + f * (by - ay))
    try:
        tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        lon, lat = tr.transform(np.concatenate(xs), np.concatenate(ys))
    except pyproj.exceptions.ProjError as e:  # CRSError is a ProjError
        raise ArtifactError(
            f"map pack {pack_dir}: grid.metric_crs {crs!r} cannot be converted to lon/lat ({e})"
        ) from None
    ring = [[round(float(a), 8), round(float(b), 8)] for a, b in zip(lon, lat, strict=True)]
    if not all(math.isfinite(v) for pt in ring for v in pt):
        raise ArtifactError(f"map pack {pack_dir}: its grid lies outside the valid area of {crs}; rebuild the pack")
    ring.append(list(ring[0]))
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    feature = {
        "type": "Feature",
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "kind": "map pack footprint",
            "pack": str(pack_dir),
            "metric_crs": crs,
            "gsd_m": g["gsd_m"],
            "width_px": g["width_px"],
            "height_px": g["height_px"],
            "tiles": man["tiles"]["count"],
            "tile_m": g["tile_m"],
        },
    }
    return {"type": "FeatureCollection", "features": [feature]}


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Write ``arr`` as .npy atomically (no pickles), whatever the suffix of the temporary file."""
    from sarloc.core.artifacts import atomic_save

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    return atomic_save(path, _write)


def file_hashes(pack_dir: Path, names: list[str]) -> dict[str, str]:
    """{name: sha256} of files in a pack."""
    return {n: sha256_file(pack_dir / n) for n in names}
