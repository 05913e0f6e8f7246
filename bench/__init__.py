"""Benchmarks of our engine against diffusers/transformers and stable-diffusion.cpp, and of the server.

Not part of the test suite: nothing here asserts a timing. Run ``python -m bench --help`` (and
``python -m bench.slow_clients``); each run appends its tables to a file under bench/results/, and
docs/BENCHMARKS.md keeps the current figures.
"""
