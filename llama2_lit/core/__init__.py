"""Pure math and sizes, no I/O: the Llama 2 losses (losses.py), the PPO reward and advantage math (rl.py), statistics
(stats.py) and global batch sizes (batching.py). Imports nothing of the project but errors.py.
"""
