"""The synthetic world: tasks, the gold oracle and perturbations (oracle.py), its tokenizer (tokenizer.py). Imports only
llama2_lit.core and errors.py.
"""
