"""Configuration: the INI reader, the frozen config dataclasses, and the TLS identities they name.

May import `condaproxy.conda` and `condaproxy.errors`.
"""
