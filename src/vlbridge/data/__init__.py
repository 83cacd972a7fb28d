"""Datasets: ShapesWorld (procedural scenes for tests, demos and the shipped tiny backbones)."""
