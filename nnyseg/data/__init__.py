"""Data: the synthetic CT phantom and dataset validation."""
