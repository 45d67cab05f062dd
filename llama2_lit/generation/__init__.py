"""Generation: the batched sampling engine (engine.py: Engine, the one generation API), the sampling settings, sampler
and prompt encoding (sampling.py) and the Llama decoder it runs (llama_decode.py). Imports models, core and errors only;
used by stages, modules, scoring and callbacks.
"""
