"""The recommendation teacher R (KBRD-style R-GCN) and the popularity baseline.

- :mod:`conkd_scale.rec.api`: ``RecTeacher.load(dir)`` and ``item_distribution`` (q_R).
- :mod:`conkd_scale.rec.train`: ``RecTeacherConfig`` and the training recipe.
- :mod:`conkd_scale.rec.model`, :mod:`~conkd_scale.rec.graph`, :mod:`~conkd_scale.rec.rgcn`:
  the model, its compact graph and the R-GCN layer.
- :mod:`conkd_scale.rec.popularity`: the popularity baseline.
"""
