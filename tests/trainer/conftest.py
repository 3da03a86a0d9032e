"""Fixtures of the trainer tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def unbound_sarloc_logging():
    """``main`` binds the sarloc logger to the captured stderr of the test that calls it; put it back after."""
    lg = logging.getLogger("sarloc")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    lg.handlers[:] = []
    lg.propagate = True
    yield
    lg.handlers[:], lg.propagate = saved[0], saved[2]
    lg.setLevel(saved[1])
