"""Mesh creation and logical -> mesh axis rules."""
