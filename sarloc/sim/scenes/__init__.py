"""Synthetic co-registered SAR/optical scenes for training, tests and demos.

A scene is built in two stages. First a land-cover *layout* is drawn: a patchwork of agricultural
fields (recursive oblique splits of a rotated square), forest blobs, hedgerows, a meandering river,
lakes and ponds, long main roads, field-edge roads and tracks, towns with a street grid and
buildings, and farmsteads. Then two modalities are rendered from the layout *independently*:

* optical (RGB, 8 bit): per-class palettes with a per-field tint, tramline stripes, soil and crown
  texture, roof colours, cast shadows from a random sun, mild blur;
* SAR (single band, linear power scaled to ``[0, 1]``): per-class backscatter levels drawn at
  random per scene, per-field offsets drawn independently of the optical tint, specular water and
  roads, forest volume texture, building double bounce, layover toward the sensor (``-x``) and
  radar shadow (``+x``) proportional to height, brighter field edges, Gamma speckle.

Each modality draws from its own random stream (spawned from the seed), so SAR brightness is not a
function of optical colour. Between the two dates a few areas change (recultivated fields, new
buildings, forest clearings, new ponds); the SAR is rendered from the changed layout and
``change_mask`` marks those pixels.

Lengths are physical: a 10 m pixel is the reference, other ``gsd_m`` values rescale every size.
"""

from __future__ import annotations

from sarloc.sim.scenes.common import CLASS_NAMES, FIELD_CLASSES, SynthConfig
from sarloc.sim.scenes.generate import generate_scene, make_preview, write_scene

__all__ = [
    "CLASS_NAMES",
    "FIELD_CLASSES",
    "SynthConfig",
    "generate_scene",
    "make_preview",
    "write_scene",
]
