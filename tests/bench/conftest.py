"""``run_bench.py`` and ``compare_builds.py`` are benchmark scripts, not tests: CI never
collects them."""

collect_ignore = ["run_bench.py", "compare_builds.py"]
