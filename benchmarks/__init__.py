"""condaproxy's benchmark harness (`python -m benchmarks`) and its soak test (soak.py)."""
