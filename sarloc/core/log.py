"""Logging set-up for command-line entry points (library code never configures handlers), and quieting noisy
libraries."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator


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


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Silence the named loggers (below ERROR) and every Python warning for the duration of the block."""
    loggers = [logging.getLogger(n) for n in logger_names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)
