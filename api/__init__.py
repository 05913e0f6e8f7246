"""HTTP side of sd-api-server: settings, request parsing, errors and the image store.

Nothing here imports torch; the Stable Diffusion core lives in ``sdcore`` and ``samplers``.
"""
