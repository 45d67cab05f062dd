"""Data: record parsing and rendering, chat formats, packing, preference pairs, prompts, and the LightningDataModules
over them. Pure functions first, thin DataModules on top. May import only llama2_lit.core, llama2_lit.world and
llama2_lit.errors."""
