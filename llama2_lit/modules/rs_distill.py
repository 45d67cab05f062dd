"""Alias: ``RSDistillModule`` lives in :mod:`llama2_lit.modules.sft` (saved run configs name this path)."""
from llama2_lit.modules.sft import RSDistillModule  # noqa: F401
