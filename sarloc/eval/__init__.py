"""Evaluation, reports, replays and research baselines: everything that measures the product, nothing that flies.

Rule: may import :mod:`sarloc.core`, :mod:`sarloc.backends`, :mod:`sarloc.mappack` and :mod:`sarloc.runtime`;
never :mod:`sarloc.trainer`, :mod:`sarloc.export`, :mod:`sarloc.calib`, :mod:`sarloc.sim` or the CLI. Nothing in
the product imports it.

* :mod:`~sarloc.eval.retrieval`: recall@K of encoders and of dense CFOG matching on a scene's queries.
* :mod:`~sarloc.eval.refine`: the refinement chain (re-rankers, graph refiner, registration, verifier) measured.
* :mod:`~sarloc.eval.rerank`: research re-rankers (query expansion, k-reciprocal, spatial) and calibration metrics.
* :mod:`~sarloc.eval.export`: exported encoders (ONNX / engines) measured, the INT8 accuracy guard.
* :mod:`~sarloc.eval.mappack`: search over a built map pack measured against a scene's truth.
* :mod:`~sarloc.eval.report` (with :mod:`~sarloc.eval.scoring`, :mod:`~sarloc.eval.gis`,
  :mod:`~sarloc.eval.track_plot`): ``sarloc report``: fixes scored against the truth, GeoJSON / CSV, the track plot.
* :mod:`~sarloc.eval.replay`: ``sarloc replay``.
"""
