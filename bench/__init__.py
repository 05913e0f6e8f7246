"""Benchmarks of our engine against diffusers/transformers and stable-diffusion.cpp (issue 6).

Not part of the test suite: nothing here asserts a timing. Run ``python -m bench --help``;
the results go to docs/BENCHMARKS.md.
"""
