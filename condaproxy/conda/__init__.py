"""Conda protocol knowledge: request paths, repodata and shard codecs, variants, base_url rewrites.

Pure: imports only `condaproxy.errors`; no catalog, no in-flight table, no HTTP.
"""
