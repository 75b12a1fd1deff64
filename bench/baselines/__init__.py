"""Baselines sluice is measured against: what users would build or pick instead of it."""
