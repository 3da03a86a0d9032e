"""Training and ONNX export of the graph refiner (post-hoc, on a frozen encoder's candidate lists).

Training data are candidate lists (:class:`sarloc.runtime.refine.Candidates`) with a label per candidate (its centre
lies
within half a tile of the query's true centre), gathered on scenes the refiner is not evaluated on. The loss is a
listwise softmax cross-entropy (:func:`~sarloc.trainer.models.refiner.listwise_loss`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sarloc.core.artifacts import atomic_save, atomic_write_json, make_manifest, sha256_file
from sarloc.core.errors import SarlocError
from sarloc.runtime.refine import REFINER_KIND, Candidates
from sarloc.trainer.joint import augment_offsets
from sarloc.trainer.models.refiner import GraphRefiner, RefinerConfig, listwise_loss

logger = logging.getLogger(__name__)


def train_refiner(
    data: list[tuple[Candidates, np.ndarray]],
    cfg: RefinerConfig,
    steps: int = 600,
    batch: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    init: GraphRefiner | None = None,
) -> GraphRefiner:
    """Train a refiner on (candidates, (Q, K) bool positives) pairs; returns the model in eval mode.

    ``init``: start from this refiner (e.g. the one trained jointly with the encoder, see
    :mod:`sarloc.trainer.joint`) instead of a fresh one; its ``k`` and ``embed_dim`` must match ``cfg``'s. With
    ``steps=0`` it is returned unchanged.
    """
    if init is not None and (init.cfg.k, init.cfg.embed_dim) != (cfg.k, cfg.embed_dim):
        raise SarlocError(
            f"the initial refiner takes k={init.cfg.k}, D={init.cfg.embed_dim} but the lists have "
            f"k={cfg.k}, D={cfg.embed_dim}; use --k {init.cfg.k} or train the refiner from scratch"
        )
    if steps == 0 and init is not None:
        return init.eval()
    if steps < 1:
        raise SarlocError(f"refiner steps must be >= 1 (0 only with an initial refiner), got {steps}")
    if not data:
        raise SarlocError("no training candidate lists for the refiner")
    query = torch.from_numpy(np.concatenate([c.query for c, _ in data])).float()
    cands = torch.from_numpy(np.concatenate([c.emb for c, _ in data])).float()
    offs = torch.from_numpy(np.concatenate([c.offsets() for c, _ in data])).float()
    pos = torch.from_numpy(np.concatenate([p & c.valid for c, p in data]))
    keep = pos.any(1)
    if int(keep.sum()) < 8:
        raise SarlocError(f"only {int(keep.sum())} training queries have a positive among their candidates")
    query, cands, offs, pos = query[keep], cands[keep], offs[keep], pos[keep]
    torch.manual_seed(seed)
    if init is not None:
        import copy

        model = copy.deepcopy(init)
    else:
        model = GraphRefiner(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    n = len(query)
    model.train()
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="refiner", unit="step")
    for _ in it:
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        # augmentation: random rotation and flip of the ground offsets (the map has no preferred direction)
        loss = listwise_loss(model(query[idx], cands[idx], augment_offsets(offs[idx], g)), pos[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    logger.info("refiner trained: %d lists, %d steps, last loss %.3f", n, steps, float(loss.detach()))
    return model


class _Export(torch.nn.Module):
    def __init__(self, model: GraphRefiner) -> None:
        super().__init__()
        self.model = model

    def forward(self, query: torch.Tensor, cands: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.model(query, cands, offsets)


def export_refiner(
    model: GraphRefiner, out: str | Path, parent_sha256: str | None = None, tol: float = 1e-4, info: dict | None = None
) -> Path:
    """Export to ONNX (dynamo exporter, opset 18, dynamic batch), check it, test parity with PyTorch.

    Writes ``out`` and its manifest (same stem, ``.json``: config, parent encoder hash, sha256, parity).

    Raises:
        SarlocError: the refiner has extra features (export covers the embeddings+positions model), or ONNX
            Runtime differs from PyTorch by more than ``tol``.
    """
    import onnx
    import onnxruntime as ort

    from sarloc.core.log import quiet

    cfg = model.cfg
    if cfg.extra_features:
        raise SarlocError("export_refiner exports refiners without extra features")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    k, d = cfg.k, cfg.embed_dim
    g = torch.Generator().manual_seed(0)
    ex = (
        torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1),
        torch.nn.functional.normalize(torch.randn(2, k, d, generator=g), dim=-1),
        torch.randn(2, k, 2, generator=g) * 3,
    )
    wrapped = _Export(model).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quiet("torch.onnx", "onnxscript", "onnx_ir"):
        prog = torch.onnx.export(
            wrapped,
            ex,
            dynamo=True,
            opset_version=18,
            input_names=["query", "cands", "offsets"],
            output_names=["logits"],
            dynamic_shapes={"query": {0: batch}, "cands": {0: batch}, "offsets": {0: batch}},
            verbose=False,
        )
    proto = prog.model_proto
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in (1, 7):
        gq = torch.Generator().manual_seed(b)
        x = (
            torch.nn.functional.normalize(torch.randn(b, d, generator=gq), dim=-1),
            torch.nn.functional.normalize(torch.randn(b, k, d, generator=gq), dim=-1),
            torch.randn(b, k, 2, generator=gq) * 3,
        )
        with torch.no_grad():
            ref = wrapped(*x).numpy()
        got = sess.run(["logits"], {n: t.numpy() for n, t in zip(("query", "cands", "offsets"), x, strict=True)})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    if worst > tol:
        raise SarlocError(f"refiner ONNX parity failed: max |torch - ort| = {worst:.2e} > {tol:.0e}")
    atomic_save(out, lambda tmp: Path(tmp).write_bytes(data))
    man = make_manifest(
        REFINER_KIND,
        parent_sha256=parent_sha256,
        file=out.name,
        sha256=sha256_file(out),
        config=cfg.to_dict(),
        inputs={"query": ["B", d], "cands": ["B", k, d], "offsets": ["B", k, 2]},
        outputs={"logits": ["B", k]},
        parity_max_abs=worst,
        info=info or {},
    )
    atomic_write_json(out.with_suffix(".json"), man)
    logger.info("refiner exported to %s (parity %.1e)", out, worst)
    return out


__all__ = ["export_refiner", "train_refiner"]


def _gather_scene(
    model, cfg, scene_dir, kind: str, n: int, seed: int, k: int, window_px: int, pool: int = 0, shortlister=None
):
    """Candidate lists of a scene; with ``pool`` also the pool of P candidates (and, given a shortlister, the
    shortlisted top-K lists instead of the coarse top-K)."""
    from sarloc.core.preprocess import crop_windows
    from sarloc.core.registration import LocalRegistrar, ShortlistRegistrar
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.refine import dense_gallery, finish_pool, gather, gather_pool
    from sarloc.eval.retrieval import embed_all
    from sarloc.trainer.checkpoint import checkpoint_embed_fns

    scene = load_scene(scene_dir)
    fs, fo = checkpoint_embed_fns(model)
    with torch.no_grad():
        gal = dense_gallery(scene, fo, cfg.preprocess, window_px, 8)
        q = make_queries(scene, kind, window_px, n, seed)
        if not pool:
            return scene, gather(scene, q, fs, gal, cfg.preprocess, k), None
        qemb = embed_all(fs, crop_windows(scene.sar_gray, q.origins, window_px), cfg.preprocess)
    pd = gather_pool(scene, q, qemb, gal, pool, ShortlistRegistrar(scene.optical_gray))
    cd = None
    if shortlister is not None:
        cd = finish_pool(scene, q, pd, gal[0], shortlister, k, LocalRegistrar(scene.optical_gray))
    return scene, cd, (pd, q, gal[0])


def refine_checkpoint(
    checkpoint: str | Path,
    scene_dirs: list[str | Path],
    out_dir: str | Path | None = None,
    k: int | None = None,
    steps: int = 600,
    queries: int = 400,
    radius_px: float = 16.0,
    window_px: int = 64,
    pool: int = 200,
    joint: bool = True,
) -> dict[str, Path]:
    """Post-hoc refiner + verifier for a trained encoder, from candidate lists gathered on ``scene_dirs``.

    When the checkpoint carries a refiner trained jointly with the encoder (``sarloc train --refiner``) and
    ``joint`` is true, that refiner is the starting point: ``steps`` fine-tune it on the gathered lists, and
    ``steps=0`` exports it unchanged. ``k`` defaults to the joint refiner's (else 10); it must match it.

    Scenes the encoder was trained on give optimistic lists (their embeddings match better than a new scene's);
    prefer scenes held out from the encoder (``benchmarks/refine_loso.py`` does it that way). Writes
    ``shortlister.json`` (orders a pool of ``pool`` coarse candidates by low-resolution registration and
    similarity), ``refiner.onnx`` (+ manifest; trained on the shortlisted top-``k`` lists) and ``verifier.json`` into
    ``out_dir`` (default: beside the checkpoint), all with the checkpoint's sha256 as parent.
    """
    from tqdm import tqdm

    from sarloc.runtime.refine import OnnxRefiner
    from sarloc.trainer.checkpoint import load_checkpoint, load_joint_refiner

    checkpoint = Path(checkpoint)
    init = load_joint_refiner(checkpoint) if joint else None
    if steps == 0 and init is None:
        raise SarlocError(
            f"--steps 0 needs a jointly trained refiner, and {checkpoint} has none (sarloc train --refiner)"
        )
    k = k or (init.cfg.k if init is not None else 10)
    if init is not None and init.cfg.k != k:
        raise SarlocError(f"the joint refiner of {checkpoint} takes k={init.cfg.k} candidates, not {k}")
    out = Path(out_dir) if out_dir else checkpoint.parent
    model, cfg, _ = load_checkpoint(checkpoint)
    parent = sha256_file(checkpoint)
    from sarloc.core.registration import LocalRegistrar
    from sarloc.eval.refine import finish_pool, fit_verifier
    from sarloc.runtime.refine import Shortlister, shortlist_features

    pools = []
    for sd in tqdm(scene_dirs, desc="candidate pools", unit="scene"):
        scene, _, extra = _gather_scene(model, cfg, sd, "arbitrary", queries, 1, k, window_px, pool=pool)
        pools.append((scene, *extra))
    f = np.concatenate([shortlist_features(p.low, p.sims, p.valid)[p.valid] for _, p, _, _ in pools])
    y = np.concatenate([p.hits()[p.valid] for _, p, _, _ in pools])
    names = [Path(s).name for s in scene_dirs]
    sl = Shortlister.fit(f, y, radius_px=window_px / 2.0, meta={"trained_on": names, "pool": pool})
    spath = sl.save(out / "shortlister.json", parent_sha256=parent)
    lists = [finish_pool(sc, q, p, g, sl, k, LocalRegistrar(sc.optical_gray)) for sc, p, q, g in pools]
    dim = lists[0].cands.emb.shape[2]
    ref_model = train_refiner(
        [(d.cands, d.positives()) for d in lists], RefinerConfig(k=k, embed_dim=dim), steps, init=init
    )
    how = "post-hoc" if init is None else ("joint" if steps == 0 else f"joint + {steps} post-hoc steps")
    onnx_path = export_refiner(ref_model, out / "refiner.onnx", parent, info={"trained_on": names, "training": how})
    refiner = OnnxRefiner(onnx_path)
    ver = fit_verifier(lists, "gnn", refiner, radius_px, meta={"trained_on": names})
    vpath = ver.save(out / "verifier.json", parent_sha256=parent)
    return {"refiner": onnx_path, "verifier": vpath, "shortlister": spath}


def evaluate_checkpoint_refined(
    checkpoint: str | Path,
    scene_dir: str | Path,
    eval_cfg,
    refiner: str | Path | None = None,
    verifier: str | Path | None = None,
    rerank_name: str | None = None,
    k: int = 10,
    threshold: float = 0.5,
    pool: int = 200,
) -> dict:
    """``sarloc eval --refine``: every re-ranker alone and with metric verification, aligned and arbitrary queries.

    The refiner and verifier default to ``refiner.onnx`` / ``verifier.json`` beside the checkpoint; the refiner's
    and verifier's parent hash must be the checkpoint's.
    """
    from sarloc.core.errors import ArtifactError
    from sarloc.eval.refine import evaluate_refined
    from sarloc.eval.rerank import RERANKERS
    from sarloc.runtime.refine import OnnxRefiner, Verifier
    from sarloc.trainer.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    parent = sha256_file(checkpoint)
    rpath = Path(refiner) if refiner else checkpoint.parent / "refiner.onnx"
    vpath = Path(verifier) if verifier else checkpoint.parent / "verifier.json"
    ref = OnnxRefiner(rpath) if rpath.is_file() else None
    ver = Verifier.load(vpath) if vpath.is_file() else None
    if ref is not None and ref.encoder_sha256 != parent:
        raise ArtifactError(f"refiner {rpath} was trained for another encoder; run `sarloc train-refiner` for this one")
    if ver is not None and ver.parent_sha256 != parent:
        raise ArtifactError(f"verifier {vpath} was fitted for another encoder; run `sarloc train-refiner`")
    if ref is None or ver is None:
        logger.warning(
            "no refiner/verifier beside %s: run `sarloc train-refiner`; GNN and +metric rows skipped", checkpoint
        )
    names = (rerank_name,) if rerank_name else RERANKERS
    if rerank_name and rerank_name not in RERANKERS:
        raise SarlocError(f"unknown re-ranker {rerank_name!r}; choose one of {', '.join(RERANKERS)}")
    model, cfg, _ = load_checkpoint(checkpoint)
    res: dict = {
        "scene": Path(scene_dir).name,
        "checkpoint": str(checkpoint),
        "refiner": str(rpath) if ref else None,
        # "post-hoc", "joint" or "joint + N post-hoc steps" (refiners exported before this field: unknown)
        "refiner_training": (ref.manifest.get("info") or {}).get("training", "unknown") if ref else None,
    }
    for kind in ("aligned", "arbitrary"):
        scene, d, _ = _gather_scene(model, cfg, scene_dir, kind, eval_cfg.queries, eval_cfg.seed, k, eval_cfg.window_px)
        r = evaluate_refined(scene, d, ver, ref, names, threshold)
        for name, m in r.items():
            res[f"{kind}/{name}"] = m
    spath = checkpoint.parent / "shortlister.json"
    if spath.is_file() and ref is not None and ver is not None and rerank_name in (None, "gnn"):
        from sarloc.runtime.refine import Shortlister

        sl = Shortlister.load(spath)
        if sl.parent_sha256 != parent:
            raise ArtifactError(f"shortlister {spath} was fitted for another encoder; run `sarloc train-refiner`")
        for kind in ("aligned", "arbitrary"):
            scene, d, _ = _gather_scene(
                model,
                cfg,
                scene_dir,
                kind,
                eval_cfg.queries,
                eval_cfg.seed,
                k,
                eval_cfg.window_px,
                pool=pool,
                shortlister=sl,
            )
            m = evaluate_refined(scene, d, ver, ref, ("gnn",), threshold)["gnn+metric"]
            res[f"{kind}/full: pool {pool} + shortlist + gnn + metric"] = m
    return res


__all__ += ["evaluate_checkpoint_refined", "refine_checkpoint"]
