"""MACE core."""
