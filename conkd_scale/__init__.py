"""conkd_scale: ConKD (two-teacher contextualised knowledge distillation) at cluster scale."""

__version__ = "0.1.0"
