"""Map packs: ``sarloc map build | info | verify``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sarloc.cli.common import add_command


def _cmd_map_build(a: argparse.Namespace) -> int:
    from sarloc.mappack.build import MapPackConfig, build_map_pack

    cfg = MapPackConfig(
        tile_m=a.tile_m,
        stride_m=a.stride_m,
        stride_px=a.stride_px,
        min_valid_frac=a.min_valid,
        batch=a.batch,
        block_tiles=a.block_tiles,
        metric_crs=a.metric_crs,
        ann=a.ann,
        ann_nlist=a.nlist,
    )
    path = build_map_pack(a.basemap, a.export, a.out, cfg, progress=not a.no_progress, threads=a.threads, force=a.force)
    print(path)
    return 0


def _cmd_map_info(a: argparse.Namespace) -> int:
    from sarloc.mappack.pack import pack_footprint, pack_info

    info = pack_info(a.pack)
    if a.footprint:
        from sarloc.core.artifacts import atomic_write_json

        atomic_write_json(a.footprint, pack_footprint(a.pack))
        info["footprint"] = str(a.footprint)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22s} {v}")
    return 0


def _cmd_map_verify(a: argparse.Namespace) -> int:
    from sarloc.mappack.pack import MapPack, verify_map_pack

    man = verify_map_pack(a.pack)
    if a.export:
        from sarloc.backends.layout import model_path, read_model_manifest

        p = Path(a.export)
        MapPack(Path(a.pack), sar_manifest=read_model_manifest(model_path(p, "sar") if p.is_dir() else p))
    print(f"{a.pack}: OK ({man['tiles']['count']} tiles, {len(man['files'])} files match their sha256)")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the map subcommand(s) to ``sub``."""
    m = add_command(sub, "map", common, "map packs: build, show and verify reference-embedding packs")
    msub = m.add_subparsers(dest="map_cmd", required=True, metavar="SUBCOMMAND")
    b = add_command(
        msub, "build", common, "tile a basemap (GeoTIFF in any CRS, or a scene folder) and embed every tile"
    )
    b.add_argument("--basemap", required=True, help="GeoTIFF or scene folder")
    b.add_argument(
        "--export",
        metavar="DIR",
        required=True,
        help="export folder (its optical encoder embeds the tiles), or an optical .onnx",
    )
    b.add_argument("--out", required=True, help="pack folder")
    b.add_argument("--tile-m", type=float, help="tile side on the ground, metres (default: native resolution)")
    b.add_argument("--stride-m", type=float, help="tile step, metres (default: tile / 8)")
    b.add_argument("--stride-px", type=int, help="tile step, pixels (default: window / 8)")
    b.add_argument("--min-valid", type=float, default=0.5, help="skip tiles with less valid (non-nodata) area")
    b.add_argument("--metric-crs", help="metric CRS of the grid (default: own if projected, else UTM of centre)")
    b.add_argument("--batch", type=int, default=64, help="tiles per encoder call")
    b.add_argument("--block-tiles", type=int, default=32, help="tiles per side of a read block")
    b.add_argument("--ann", action="store_true", help="also build the approximate (IVF) index")
    b.add_argument("--nlist", type=int, help="IVF lists (default: about sqrt(tiles))")
    b.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    b.add_argument("--force", action="store_true", help="replace an existing pack")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=_cmd_map_build)
    i = add_command(msub, "info", common, "show a pack's manifest summary")
    i.add_argument("pack", help="map pack folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument(
        "--footprint",
        metavar="PATH",
        help="write the pack grid's extent here as a GeoJSON polygon in WGS 84 lon/lat (a pack with a CRS only)",
    )
    i.set_defaults(fn=_cmd_map_info)
    v = add_command(msub, "verify", common, "check every file's sha256 (and, with --export, the encoder match)")
    v.add_argument("pack", help="map pack folder")
    v.add_argument("--export", metavar="DIR", help="export folder (or SAR encoder .onnx) that will query the pack")
    v.set_defaults(fn=_cmd_map_verify)
