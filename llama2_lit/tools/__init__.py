"""Command-line tools over finished runs (entry level: may import everything below): gold_compare.py (held-out gold
of several policies, paired), summarize.py (sweep tables), consolidate.py (a sharded checkpoint to an HF folder).
"""
