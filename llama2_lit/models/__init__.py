"""Models: loading causal LMs and reward / value models (safetensors only, no remote code), random init, LoRA, FSDP2
sharding and shard-by-shard reading, tokenizers and chat templates, GGUF import. May import data_modules, core,
world and errors."""
