"""ONNX export of the encoder branches with self-verification (check_model + ONNX Runtime vs PyTorch parity).

One model per modality (``ModalityEncoder``): input ``windows`` (batch, C, H, W) float32 prepared by
``sarloc.core.preprocess.prepare_windows``, output ``embeddings`` (batch, D) unit-norm float32, ``batch`` a named
dynamic axis. Batch norm is folded into the convolutions by the exporter. Nothing is written unless the model
passes ``onnx.checker.check_model(full_check=True)`` and matches PyTorch within the stated tolerance.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) by default. The legacy TorchScript
exporter is kept as a fallback for environments without onnxscript; parity guards both, but it is known to
turn ``index_add`` into a scatter without add-reduction (silently wrong), so any model using scatter-like ops
(the graph refiner) must use the dynamo exporter.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.backends.layout import (
    BATCH_AXIS,
    DEFAULT_OPSET,
    EXPORT_KIND,
    INPUT_NAME,
    MODALITIES,
    ONNX_KIND,
    OUTPUT_NAME,
    manifest_path,
    model_filename,
)
from sarloc.core.artifacts import atomic_write_bytes, atomic_write_json, make_manifest, sha256_bytes, sha256_file
from sarloc.core.errors import ArtifactError, ConfigError, SarlocError, SceneError
from sarloc.core.log import quiet
from sarloc.core.preprocess import PreprocessConfig, crop_windows, prepare_windows

logger = logging.getLogger(__name__)

#: loggers of the ONNX exporters, silenced (with their warnings) during an export
ONNX_EXPORT_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")

DEFAULT_TOLERANCE = 1e-4
"""Max abs difference allowed between ONNX Runtime and PyTorch unit-norm embeddings (FP32)."""
EXPORTERS = ("auto", "dynamo", "legacy")
DYNAMO_MIN_OPSET = 18  # the dynamo exporter implements opset >= 18; it cannot down-convert this model to 17

EmbedNp = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------
# parity windows


def sample_windows(
    scene_dir: str | Path | None, window_px: int, prep: PreprocessConfig, n: int = 16, seed: int = 0
) -> tuple[dict[str, np.ndarray], str]:
    """Prepared windows for parity checks: real ones from a scene when given, else from a generated scene.

    Args:
        scene_dir: a scene folder, or None for a synthetic scene (``sarloc.sim.scenes``, seed ``seed``).
        window_px: window side, pixels.
        prep: preprocessing of the model (from its config).
        n: windows per modality.
        seed: random seed of the window positions.

    Returns:
        ``({"sar": (n, C, H, W), "optical": (n, C, H, W)} float32, source)``; ``source`` names the scene.
    """
    from sarloc.core.scene import normalise_optical, normalise_sar, to_single_band

    if scene_dir is not None:
        from sarloc.core.scene import load_scene

        scene = load_scene(scene_dir)
        grays = {"sar": scene.sar_gray, "optical": scene.optical_gray}
        source = f"scene:{scene.name}"
    else:
        from sarloc.sim.scenes import SynthConfig, generate_scene

        side = max(256, 2 * window_px)
        synth = generate_scene(SynthConfig(width_px=side, height_px=side, seed=seed))
        grays = {
            "sar": to_single_band(normalise_sar(synth["sar"], "linear_0_1"), "sar"),
            "optical": to_single_band(normalise_optical(synth["optical"], "display8"), "optical"),
        }
        source = f"synth:seed{seed}"
    h, w = grays["sar"].shape
    if window_px > min(h, w):
        raise SceneError(f"{scene_dir}: window of {window_px} px is larger than the scene ({w}x{h} px)")
    rng = np.random.default_rng(seed)
    out = {}
    for m in MODALITIES:
        origins = np.stack([rng.integers(0, w - window_px + 1, n), rng.integers(0, h - window_px + 1, n)], axis=1)
        out[m] = prepare_windows(crop_windows(grays[m], origins, window_px), prep)
    return out, source


# ----------------------------------------------------------------------------------------------
# parity


def _ort_session(model: bytes | str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def check_parity(
    model: bytes | str | Path,
    reference: EmbedNp,
    windows: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    source: str = "",
    what: str = "ONNX model",
) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs a reference embedding function on the same windows, at batch 1 and batch N.

    Args:
        model: serialised ONNX bytes or a path.
        reference: (B, C, H, W) float32 -> (B, D) float32, e.g. the PyTorch module.
        windows: (N, C, H, W) float32 prepared windows, N >= 2.
        tolerance: max abs difference allowed on the (unit-norm) embeddings.
        source: where the windows come from (recorded).
        what: name of the model in error messages.

    Returns:
        ``{"max_abs_diff", "min_cosine", "tolerance", "windows", "batch_sizes", "source", "passed"}``.

    Raises:
        ArtifactError: the difference exceeds ``tolerance`` or the outputs are not finite.
    """
    sess = _ort_session(model)
    ref = np.asarray(reference(windows), np.float32)
    full = sess.run([OUTPUT_NAME], {INPUT_NAME: windows})[0]
    one = sess.run([OUTPUT_NAME], {INPUT_NAME: windows[:1]})[0]
    if full.shape != ref.shape or one.shape != (1, ref.shape[1]):
        raise ArtifactError(f"{what}: ONNX output shapes {full.shape}/{one.shape} differ from PyTorch {ref.shape}")
    if not (np.isfinite(full).all() and np.isfinite(one).all()):
        raise ArtifactError(f"{what}: ONNX Runtime output is not finite; the export is broken")
    diff = float(max(np.abs(full - ref).max(), np.abs(one - ref[:1]).max()))
    cos = np.sum(full * ref, axis=1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    res = {
        "max_abs_diff": diff,
        "min_cosine": float(cos.min()),
        "tolerance": float(tolerance),
        "windows": len(windows),
        "batch_sizes": [1, len(windows)],
        "source": source,
        "passed": diff <= tolerance,
    }
    if not res["passed"]:
        raise ArtifactError(
            f"{what}: ONNX Runtime differs from PyTorch by {diff:.2e} (max abs, unit-norm embeddings) > tolerance "
            f"{tolerance:.0e} on {len(windows)} windows ({source}); the export is wrong, do not deploy it"
        )
    return res


# ----------------------------------------------------------------------------------------------
# export


def _have_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_exporter(exporter: str = "auto", opset: int = DEFAULT_OPSET) -> str:
    """``auto`` -> ``dynamo`` when onnxscript is installed and ``opset >= 18``, else ``legacy``."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    have_onnxscript = _have_onnxscript()
    if exporter == "legacy":
        return "legacy"
    if exporter == "dynamo":
        if not have_onnxscript:
            raise SarlocError(
                "the dynamo ONNX exporter needs onnxscript: `pip install onnxscript` (or --exporter legacy)"
            )
        if opset < DYNAMO_MIN_OPSET:
            raise ConfigError(
                f"the dynamo exporter writes opset >= {DYNAMO_MIN_OPSET}; use --opset 18 or --exporter legacy"
            )
        return "dynamo"
    if have_onnxscript and opset >= DYNAMO_MIN_OPSET:
        return "dynamo"
    logger.warning(
        "using the legacy TorchScript ONNX exporter (%s); parity is still checked",
        "onnxscript is not installed" if not have_onnxscript else f"opset {opset} < {DYNAMO_MIN_OPSET}",
    )
    return "legacy"


def _export_proto(module, example, exporter: str, opset: int, what: str = "model"):
    """Trace ``module`` on ``example`` -> onnx.ModelProto with input ``windows`` / output ``embeddings``."""
    try:
        return _run_exporter(module, example, exporter, opset)
    except Exception as e:  # the exporters raise many types; one line for the CLI, the chain for debugging
        first = (str(e).strip().splitlines() or [""])[0][:300]
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ArtifactError(
            f"{what}: the {exporter} ONNX exporter failed ({type(e).__name__}: {first}); try --exporter {other}"
        ) from e


def _run_exporter(module, example, exporter: str, opset: int):
    import onnx
    import torch

    with torch.no_grad(), quiet(*ONNX_EXPORT_LOGGERS):
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
            prog = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            do_constant_folding=True,
        )
        return onnx.load_from_string(buf.getvalue())


def _finalise_proto(proto, chw: tuple[int, int, int], embed_dim: int, metadata: dict[str, str], what: str):
    """Check the I/O signature, pin the embedding dimension, attach metadata, run the full ONNX check."""
    import onnx

    g = proto.graph
    if [i.name for i in g.input] != [INPUT_NAME] or [o.name for o in g.output] != [OUTPUT_NAME]:
        raise ArtifactError(
            f"{what}: exported I/O is {[i.name for i in g.input]} -> {[o.name for o in g.output]}, "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}]"
        )
    dims = g.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[0].dim_param != BATCH_AXIS or tuple(d.dim_value for d in dims[1:]) != chw:
        got = [d.dim_param or d.dim_value for d in dims]
        raise ArtifactError(
            f"{what}: exported input shape is {got}, expected [{BATCH_AXIS!r}, {', '.join(map(str, chw))}]"
        )
    if g.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ArtifactError(f"{what}: exported input {INPUT_NAME!r} is not float32")
    odims = g.output[0].type.tensor_type.shape.dim
    if len(odims) != 2:
        raise ArtifactError(f"{what}: exported output {OUTPUT_NAME!r} has rank {len(odims)}, expected 2")
    odims[0].dim_param = BATCH_AXIS
    odims[1].ClearField("dim_param")
    odims[1].dim_value = embed_dim
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = f"sarloc ({proto.producer_name})" if proto.producer_name else "sarloc"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{what}: onnx.checker rejected the exported model: {first}") from None
    return proto


def lint_graph(proto) -> list[str]:
    """Warnings about ops known to be exported wrongly by some exporter (e.g. scatter without reduction)."""
    notes = []
    for node in proto.graph.node:
        if node.op_type in ("ScatterND", "ScatterElements"):
            red = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if red == "none":
                notes.append(
                    f"{node.op_type} {node.name!r} has no reduction: if the source used index_add/scatter_add, "
                    "the export is wrong (legacy exporter trap)"
                )
    return notes


def _onnx_metadata(
    modality: str, dim: int, window_px: int, prep: PreprocessConfig, checkpoint_sha256: str
) -> dict[str, str]:
    """The ``sarloc.*`` metadata properties written into an exported encoder."""
    return {
        "sarloc.modality": modality,
        "sarloc.embed_dim": str(dim),
        "sarloc.window_px": str(window_px),
        "sarloc.preprocess": json.dumps(prep.to_dict(), sort_keys=True),
        "sarloc.checkpoint_sha256": checkpoint_sha256,
    }


def _onnx_manifest(
    out_path: Path,
    proto,
    model,
    modality: str,
    window_px: int,
    dim: int,
    prep: PreprocessConfig,
    tools: dict[str, str],
    checkpoint: dict[str, str],
    parity: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the FP32 model written at ``out_path`` (``proto``, one branch of ``model``).

    Args:
        tools: the exporter used and the torch and onnx versions.
        checkpoint: the parent checkpoint's file name and sha256.
    """
    chw = (model.cfg.in_channels, window_px, window_px)
    return make_manifest(
        ONNX_KIND,
        parent_sha256=checkpoint["sha256"],
        file=out_path.name,
        sha256=sha256_file(out_path),
        modality=modality,
        precision="fp32",
        opset=int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
        **tools,
        input={"name": INPUT_NAME, "shape": [BATCH_AXIS, *chw], "dtype": "float32"},
        output={"name": OUTPUT_NAME, "shape": [BATCH_AXIS, dim], "dtype": "float32", "unit_norm": True},
        embed_dim=dim,
        window_px=window_px,
        preprocess=prep.to_dict(),
        encoder=model.cfg.to_dict(),
        checkpoint=checkpoint,
        checkpoint_sha256=checkpoint["sha256"],
        ops=sorted({n.op_type for n in proto.graph.node}),
        parity=parity,
    )


def _trace(
    model,
    modality: str,
    window_px: int,
    prep: PreprocessConfig,
    windows: np.ndarray,
    checkpoint_sha256: str,
    exporter: str,
    opset: int,
    what: str,
):
    """Trace one branch of ``model`` to a checked ONNX proto with its metadata; returns the branch module, the
    proto and the embedding size.

    Raises:
        ArtifactError: the windows do not fit the model, the exporter fails or the ONNX check rejects the model.
    """
    import torch

    from sarloc.trainer.models.encoder import ModalityEncoder

    module = ModalityEncoder(model, modality).eval()
    c = model.cfg.in_channels
    chw = (c, window_px, window_px)
    if windows.shape[1:] != chw:
        raise ArtifactError(f"parity windows have shape {windows.shape[1:]}, the model takes {chw}")
    example = torch.from_numpy(np.ascontiguousarray(windows[:2]))
    with torch.no_grad():
        dim = int(module(example).shape[1])  # the output size (may exceed cfg.embed_dim, e.g. a layout branch)
    meta = _onnx_metadata(modality, dim, window_px, prep, checkpoint_sha256)
    proto = _finalise_proto(_export_proto(module, example, exporter, opset, what), chw, dim, meta, what)
    for note in lint_graph(proto):
        logger.warning("%s: %s", what, note)
    return module, proto, dim


def export_encoder(
    model,
    modality: str,
    out_path: str | Path,
    *,
    window_px: int,
    prep: PreprocessConfig,
    windows: np.ndarray,
    checkpoint_sha256: str,
    checkpoint_name: str = "",
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    source: str = "",
) -> dict[str, Any]:
    """Export one branch of a CrossModalEncoder to ONNX, verify it and write it with its manifest.

    Args:
        model: a ``CrossModalEncoder`` in eval mode.
        modality: "sar" or "optical".
        out_path: the ``.onnx`` file to write (its manifest goes beside it).
        window_px: window side the model is used with (the input's H and W).
        prep: preprocessing the model expects (recorded in the manifest).
        windows: (N, C, H, W) prepared windows of this modality for the parity check.
        checkpoint_sha256: the parent checkpoint's sha256.
        checkpoint_name: the checkpoint file name (recorded).
        opset: ONNX opset.
        exporter: "auto", "dynamo" or "legacy" (see :func:`resolve_exporter`).
        tolerance: parity tolerance (max abs difference on unit-norm embeddings).
        source: where ``windows`` come from (recorded).

    Returns:
        The manifest written beside the model.

    Raises:
        ArtifactError: the model fails the ONNX check or the parity check (nothing is written).
    """
    import onnx
    import torch

    out_path = Path(out_path)
    used = resolve_exporter(exporter, opset)
    what = f"{modality} encoder ({out_path.name})"
    module, proto, dim = _trace(model, modality, window_px, prep, windows, checkpoint_sha256, used, opset, what)
    data = proto.SerializeToString()

    @torch.no_grad()
    def reference(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x)).numpy()

    parity = check_parity(data, reference, windows, tolerance, source, what)
    atomic_write_bytes(out_path, data)
    tools = {"exporter": used, "torch_version": torch.__version__, "onnx_version": onnx.__version__}
    checkpoint = {"file": checkpoint_name, "sha256": checkpoint_sha256}
    man = _onnx_manifest(out_path, proto, model, modality, window_px, dim, prep, tools, checkpoint, parity)
    atomic_write_json(manifest_path(out_path), man)
    logger.info(
        "%s: parity max |diff| %.1e (tolerance %.0e, %s), exporter %s, opset %d",
        what,
        parity["max_abs_diff"],
        tolerance,
        source,
        used,
        man["opset"],
    )
    return man


def read_checkpoint_sha256(checkpoint: str | Path) -> str:
    """The checkpoint's sha256 from its manifest (``checkpoint.json``), or computed when there is none."""
    checkpoint = Path(checkpoint)
    man = checkpoint.with_suffix(".json")
    if man.is_file():
        try:
            obj = json.loads(man.read_text())
        except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            obj = None
        sha = obj.get("sha256") if isinstance(obj, dict) else None
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    return sha256_file(checkpoint)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    scene_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    exporter: str = "auto",
    parity_windows: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a trained checkpoint: one verified ONNX model + manifest per modality, and ``export.json``.

    Args:
        checkpoint: ``checkpoint.pt`` written by ``sarloc train``.
        out_dir: export folder (created; existing models are replaced atomically).
        opset: ONNX opset (18 by default: the lowest the dynamo exporter writes; TensorRT 10 parses it).
        scene_dir: a scene whose real windows are used for the parity check (else a generated scene).
        tolerance: parity tolerance, max abs difference on unit-norm embeddings.
        exporter: "auto" (dynamo when onnxscript is installed), "dynamo" or "legacy".
        parity_windows: windows per modality in the parity check.
        seed: seed of the parity windows.

    Returns:
        The export index written to ``out_dir/export.json``: checkpoint hash and, per modality, file, sha256
        and parity result.

    Raises:
        ArtifactError: unreadable checkpoint, failed ONNX check or parity beyond tolerance.
    """
    from sarloc.trainer.checkpoint import load_checkpoint

    if parity_windows < 2:
        raise ConfigError("parity needs at least 2 windows per modality")
    checkpoint = Path(checkpoint)
    model, cfg, _info = load_checkpoint(checkpoint)
    ck_sha = read_checkpoint_sha256(checkpoint)
    used = resolve_exporter(exporter, opset)  # once, so a fallback warns once
    windows, source = sample_windows(scene_dir, cfg.window_px, cfg.preprocess, parity_windows, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    mans: dict[str, dict[str, Any]] = {}
    # Export targets. The graph refiner joins here when it lands: add its module with its own example inputs,
    # force exporter="dynamo" (the legacy exporter turns index_add into a scatter without add-reduction) and
    # extend tests/export/test_onnx_export.py so that parity covers every op it uses.
    for modality in MODALITIES:
        man = export_encoder(
            model,
            modality,
            out_dir / model_filename(modality),
            window_px=cfg.window_px,
            prep=cfg.preprocess,
            windows=windows[modality],
            checkpoint_sha256=ck_sha,
            checkpoint_name=checkpoint.name,
            opset=opset,
            exporter=used,
            tolerance=tolerance,
            source=source,
        )
        mans[modality] = man
        models[modality] = {"file": man["file"], "sha256": man["sha256"], "parity": man["parity"]}
    index = make_manifest(
        EXPORT_KIND,
        parent_sha256=ck_sha,
        checkpoint=checkpoint.name,  # its identity is parent_sha256; a path would tie the index to one machine
        models=models,
        window_px=cfg.window_px,
        preprocess=cfg.preprocess.to_dict(),
        embed_dim=mans["sar"]["embed_dim"],
        digest=sha256_bytes("\n".join(f"{m}:{v['sha256']}" for m, v in models.items()).encode()),
    )
    atomic_write_json(out_dir / "export.json", index)
    return index
