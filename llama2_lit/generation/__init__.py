"""Generation: the batched sampling engine (engine.py). Imports models and core; used by stages, modules and callbacks.
"""
