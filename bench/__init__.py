"""Benchmarks of esta_kernels (see bench/README.md). A package so `python -m bench.compare` and the
pytest-benchmark file can import the shared shapes and providers."""
