"""Error feedback (in progress)."""
