"""Test helper (not a conftest: a conftest.py here would shadow tests/conftest.py).

Import it as ``from export.tiny_export import make_tiny_export`` from tests/export, tests/calib and tests/runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def make_tiny_export(tmp_path_factory) -> Path:
    """ONNX export of a tiny from-scratch encoder (smoke preset, 0 steps), built once per session in basetemp.

    Returns the export folder; its checkpoint is ``folder.parent / "run" / "checkpoint.pt"``. Treat as read-only
    (copy it before writing INT8 models or engines into it).
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    root = tmp_path_factory.getbasetemp() / "tiny_export_cache"
    out = root / "export"
    if (out / "export.json").is_file():
        return out
    from sarloc.export.onnx import export_checkpoint
    from sarloc.trainer.checkpoint import save_checkpoint
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.models.encoder import CrossModalEncoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = resolve_config("smoke")
        torch.manual_seed(0)
        model = CrossModalEncoder(cfg.encoder).eval()
        ckpt = save_checkpoint(root / "run" / "checkpoint.pt", model, cfg, {"steps": 0})
        export_checkpoint(ckpt, out)
    finally:
        torch.set_num_threads(threads)
    return out
