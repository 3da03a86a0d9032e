"""``python -m sarloc ...``: the same as the ``sarloc`` command."""

import sys

from sarloc.cli import main

sys.exit(main())
