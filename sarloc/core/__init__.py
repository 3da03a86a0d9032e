"""The torch-free core that every other package builds on.

Rule: modules here import only the standard library, numpy, OpenCV, tifffile and pyproj, and nothing else from
sarloc (``sarloc.core`` modules may import each other).

* :mod:`~sarloc.core.errors`, :mod:`~sarloc.core.log`: the error types every command maps to one-line messages;
  logging set-up.
* :mod:`~sarloc.core.artifacts`: atomic writes, manifests with the parent's hash, verification.
* :mod:`~sarloc.core.config`: dataclasses built from TOML / JSON with type checks.
* :mod:`~sarloc.core.geo`: pixel <-> metric <-> lon/lat frames, tile grids, meridian convergence.
* :mod:`~sarloc.core.scene`: the scene folder format (co-registered SAR / optical images, metadata, queries).
* :mod:`~sarloc.core.preprocess`: window crops and the encoders' input channels.
* :mod:`~sarloc.core.cfog`: the CFOG descriptor and dense CFOG matching.
* :mod:`~sarloc.core.registration`: local CFOG registration of a window around candidate positions (sub-pixel).
* :mod:`~sarloc.core.peaks`: non-maximum suppression on dense score grids.
"""
