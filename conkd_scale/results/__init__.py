"""The results table of METHOD.md: train and evaluate every system on one dataset."""
