"""The one error a bad config raises (a file, a key and the problem, in one line)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""
