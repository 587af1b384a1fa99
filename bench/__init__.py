"""Benchmarks of the project's own objects (run from the repository root:
``python -m bench.<name>``); results and commands in bench/RESULTS.md."""
