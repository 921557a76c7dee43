"""The client side: the aiohttp upstream client, mirrors, redirects, client-token admission.

May import `condaproxy.config`, `condaproxy.conda` and `condaproxy.errors`.
"""
