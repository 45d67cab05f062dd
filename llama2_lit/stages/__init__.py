"""Stage runners that are not one LightningModule fit: rejection sampling (rs.py, its bag rs_bag.py), preference
collection (collect.py), the iterative pipeline (pipeline.py), and the bootstrap of missing inputs (bootstrap.py).
They may import everything below the entry: modules, callbacks, models, generation, data_modules, core, world.
"""
