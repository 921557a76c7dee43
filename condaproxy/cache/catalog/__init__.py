"""The unit catalog (SQLite): unit rows, learned digests and bases, eviction queries."""
