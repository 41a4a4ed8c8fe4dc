"""Benchmarks are not tests: they live outside ``tests/`` and run only when asked (``python -m pytest bench/``)."""
