"""The DeepSpeed training core shared by every job (trainer, data stream, checkpoints,
DeepSpeed-config handling, metric logging) and the dialogue-teacher recipe."""
