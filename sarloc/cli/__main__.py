"""``python -m sarloc.cli``: the same as ``sarloc``."""

import sys

from sarloc.cli import main

sys.exit(main())
