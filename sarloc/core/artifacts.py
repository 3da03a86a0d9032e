"""Artefact plumbing shared by every stage: sha256, atomic writes, manifests and their verification."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sarloc import __version__
from sarloc.core.errors import ArtifactError, brief

MANIFEST_SCHEMA = 1


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: the result gets the mode any new file would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def make_manifest(kind: str, parent_sha256: str | None = None, **fields: Any) -> dict[str, Any]:
    """A manifest dict: schema, package version, artefact kind, parent hash and free fields."""
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "sarloc_version": __version__,
        "parent_sha256": parent_sha256,
        **fields,
    }


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object, raising a one-line ArtifactError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what}: {path} not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        raise ArtifactError(f"{what}: {path} is not valid JSON ({str(e)[:200]}); regenerate it") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what}: {path} must hold a JSON object")
    return obj


def verify_files(root: str | Path, sha256_by_name: dict[str, str], what: str) -> None:
    """Check that each file under ``root`` has the recorded sha256; raise ArtifactError naming the first mismatch."""
    root = Path(root)
    if not isinstance(sha256_by_name, dict):
        raise ArtifactError(
            f"{what}: the manifest's file list under {root} is not a {{name: sha256}} object; rebuild it"
        )
    for name, expected in sha256_by_name.items():
        if not (isinstance(name, str) and name and isinstance(expected, str)):
            raise ArtifactError(f"{what}: manifest entry {name!r:.60}: {expected!r:.20} is not a file name and sha256")
        p = root / name
        try:
            found = p.is_file()
        except OSError:  # e.g. a name too long for the file system
            found = False
        if not found:
            shown = str(p) if str(p).isprintable() else repr(str(p))  # one line
            raise ArtifactError(f"{what}: {shown[:300]} is missing; rebuild the {what}")
        got = sha256_file(p)
        if got != expected:
            raise ArtifactError(
                f"{what}: {p} has sha256 {got[:12]}, manifest says {expected[:12]} (tampered or truncated); rebuild it"
            )


def load_npy(path: str | Path, what: str, fix: str) -> Any:
    """``np.load(path, mmap_mode="r", allow_pickle=False)`` with one-line errors for missing, truncated, corrupt or
    pickled files.

    Args:
        path: the ``.npy`` file.
        what: what it is, for the message ("map pack embeddings", "calibration set").
        fix: what to do about it ("rebuild the pack with `sarloc map build`").

    Raises:
        ArtifactError: ``"{what}: {path} is missing; {fix}"`` or ``"... is truncated or not a .npy file (...)"``.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what}: {path} is missing; {fix}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated, a corrupt header (numpy raises ValueError, SyntaxError, TokenError...), pickled
        detail = brief(e)
        raise ArtifactError(
            f"{what}: {path} is truncated or not a .npy file ({type(e).__name__}: {detail}); {fix}"
        ) from None
