"""sarloc: GNSS-free UAV localisation by matching SAR strips against an optical basemap."""

import logging

__version__ = "0.1.0"

logging.getLogger("sarloc").addHandler(logging.NullHandler())
