"""User-facing errors: one line, naming the thing and the fix."""

from __future__ import annotations


class SarlocError(Exception):
    """A known user error (bad input, missing file, mismatched artefact).

    The CLI prints ``str(err)`` on one line and exits with status 1; bugs still raise.
    """


class SceneError(SarlocError):
    """A scene folder, image or ``scene.json`` is missing, corrupt or inconsistent."""


class ConfigError(SarlocError):
    """A configuration value or preset is malformed."""


class ArtifactError(SarlocError):
    """An artefact (checkpoint, ONNX, map pack, engine) is missing, corrupt or mismatched."""
