"""Benchmarks of workerpool against same-run baselines: `python -m bench`.

See docs/PERFORMANCE.md.
"""
