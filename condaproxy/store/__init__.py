"""Blob stores: where verified unit bytes live, keyed by their sha256 (filesystem now, S3 next).

May import `condaproxy.errors` only.
"""
