"""d4m.export."""
