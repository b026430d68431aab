"""The benchmark (``python bench/bench.py``) and its targets."""
