"""User-facing errors: one line, naming the thing and the fix."""

from __future__ import annotations

#: characters that ``str.splitlines`` breaks on, and the escape that replaces each in a message
_LINE_BREAKS = {
    "\n": "\\n",
    "\r": "\\r",
    "\v": "\\x0b",
    "\f": "\\x0c",
    "\x1c": "\\x1c",
    "\x1d": "\\x1d",
    "\x1e": "\\x1e",
    "\x85": "\\x85",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_ESCAPE = str.maketrans(_LINE_BREAKS)


def one_line(text: str) -> str:
    """``text`` with every line break escaped (``"a\\nb"`` -> ``a\\\\nb``), so that it prints on one line."""
    return text.translate(_ESCAPE)


def brief(e: BaseException, limit: int = 200) -> str:
    """A library error's message collapsed to one short line (its type name when the message is empty)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


class SarlocError(Exception):
    """A known user error (bad input, missing file, mismatched artefact).

    The CLI prints ``str(err)`` on one line and exits with status 1; bugs still raise. Messages often quote
    values read from untrusted files (a manifest field, a decoder's message); ``str(err)`` escapes any line
    break in them, so the one-line rule holds whatever the message was built from.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())


class SceneError(SarlocError):
    """A scene folder, image or ``scene.json`` is missing, corrupt or inconsistent."""


class ConfigError(SarlocError):
    """A configuration value or preset is malformed."""


class ArtifactError(SarlocError):
    """An artefact (checkpoint, ONNX, map pack, engine) is missing, corrupt or mismatched."""
