"""The offline teacher cache: the teachers run once, the students read them from disk.

``launch/cache_teachers.py`` (:mod:`.writer`) runs D (sharded, ZeRO-3 inference, as in online
mode) and R over the training and validation sequences and writes ``teachers.cache_dir``;
the distillation job with ``teachers.mode=offline`` (:mod:`.reader`) streams it in its
data-loader order and never builds D. :mod:`.manifest` holds the fingerprint (what the
content depends on), the layout and the checksums. Format: ``docs/teacher_cache.md``.
"""
