"""Logging set-up for command-line entry points only (library code never configures handlers)."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Configure the ``sarloc`` logger with one stderr handler.

    Args:
        verbose: show DEBUG messages.
        quiet: show only warnings and errors.
    """
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logger = logging.getLogger("sarloc")
    for h in list(logger.handlers):
        if not isinstance(h, logging.NullHandler):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
