"""Command-line tools over finished runs: gold_compare.py (held-out gold of several policies), summarize.py.
"""
