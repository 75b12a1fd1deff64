"""sluice benchmarks: the DESIGN.md targets measured against the baselines users would pick instead.

`python bench/run.py` (or `--quick`) is the entry point. Every benchmark talks only to loopback,
starts the servers it needs as subprocesses and stops them, and is bounded in count and time.
"""
