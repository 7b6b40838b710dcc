"""Data sets, task heads, training and metrics beyond classification (issue 6)."""
