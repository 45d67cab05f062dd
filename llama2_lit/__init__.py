"""llama2-lit: the Llama 2 fine-tuning recipe on Lightning + Hydra.

Layers, each importing only those after it (tests/test_imports.py): the entry (``__main__``, ``run``, ``options``,
``config``, ``plan``, ``tools/``) -> ``stages/`` -> ``modules/`` -> ``scoring`` -> ``callbacks/`` -> ``generation/``
-> ``models/`` -> ``data_modules/`` -> ``core/`` and ``world/`` (and ``errors``).
"""
