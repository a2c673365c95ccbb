"""Placeholder replaced by the trainer (issue 4)."""
