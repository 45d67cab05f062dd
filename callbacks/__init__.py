"""Lightning callbacks: gold evaluation, tokens/s, rating-bucket accuracy, atomic checkpoints and retention,
preemption, resume state, steps.jsonl. May import generation, models, data_modules, core, world and errors."""
