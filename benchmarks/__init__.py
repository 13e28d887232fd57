"""Benchmarks of the fashion-gan training pipeline against the classic DCGAN recipe.

`python -m benchmarks.run` (or `make bench`) runs every comparison and writes benchmarks/RESULTS.md.
"""
