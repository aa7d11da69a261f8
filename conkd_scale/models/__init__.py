"""Causal-LM builder (size presets, from_pretrained, CRS tokens) and Hugging Face export."""
