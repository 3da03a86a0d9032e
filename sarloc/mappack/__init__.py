"""Map packs (torch-free): a basemap's tile embeddings as a memory-mapped matrix, and fast search over it.

* :func:`build_map_pack` (``sarloc map build``): GeoTIFF (any CRS) or scene folder -> metric tile grid -> optical
  encoder -> ``PACK/`` (``embeddings.npy`` float16, ``tiles.npy``, ``pack.json``).
* :class:`MapPack` / :func:`verify_map_pack` / :func:`pack_info` (``sarloc map info|verify``).
* :class:`PackSearcher`: exact top-K in blocks, geo prior, IVF approximate index, NMS in metres.

Heavy dependencies (rasterio, onnxruntime) are imported inside the functions that need them.
"""

from sarloc.mappack.build import MapPackConfig, build_map_pack
from sarloc.mappack.pack import MapPack, check_encoder_match, pack_info, read_pack_manifest, verify_map_pack
from sarloc.mappack.search import GridIndex, PackSearcher, SearchResult, exact_topk, nms_metres

__all__ = [
    "GridIndex",
    "MapPack",
    "MapPackConfig",
    "PackSearcher",
    "SearchResult",
    "build_map_pack",
    "check_encoder_match",
    "exact_topk",
    "nms_metres",
    "pack_info",
    "read_pack_manifest",
    "verify_map_pack",
]
