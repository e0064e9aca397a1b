"""Shard reader and reference CM3 trainer (phase F consumers); not built yet: see docs/outputs.md."""
