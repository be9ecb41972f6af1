"""``run_bench.py`` is a benchmark script, not a test: CI never collects it."""

collect_ignore = ["run_bench.py"]
