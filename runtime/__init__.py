"""d4m.runtime."""
