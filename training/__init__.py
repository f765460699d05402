"""d4m.training."""
