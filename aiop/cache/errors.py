"""The one exception the cache raises on bad input."""

from __future__ import annotations


class CacheError(ValueError):
    """A cache file or record is unusable; the message is one line that says which and why."""
