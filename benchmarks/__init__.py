"""Benchmark drivers (installed as ``prefast.benchmarks``; ``prefast bench`` calls them).

- ``store_bench``: write and cold-read throughput of every store tier against baselines.
- ``train_bench``: baseline / freezeout / prefast over t0 values and seeds.
- ``run_all``: regenerates every file under ``benchmarks/results/`` (``make bench``).
"""
