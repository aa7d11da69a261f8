"""Evaluation: metrics of generated replies, generation, the pipeline system, the results-table
evaluation job (``run.evaluate``) and the interactive chat.

Submodules are imported on use (``from conkd_scale.eval.run import evaluate``) so that the
pure metric code does not pull in transformers.
"""
