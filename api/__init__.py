"""HTTP side of sd-api-server: settings, request parsing, errors, the image store, the loaded
models and the generation queue. The Stable Diffusion core lives in ``sdcore`` and ``samplers``.
"""
