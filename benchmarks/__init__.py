"""Benchmarks of the search loop (``python -m benchmarks.speed``); not imported by the package."""
