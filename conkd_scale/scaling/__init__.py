"""Scaling studies of ConKD's gate against student size (``launch/scaling_study.py``)."""
