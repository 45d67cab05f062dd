"""Command-line tools over finished runs (entry level: may import everything below): gold_compare.py (held-out gold
of several policies, paired), overopt.py (the best-of-n over-optimisation probe: gold and RM reward against
KL_bon), summarize.py (sweep tables), consolidate.py (a sharded checkpoint to an HF folder).
"""
