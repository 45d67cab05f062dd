"""The LightningModules, one per trainable stage (SFT and RS distillation, reward model, PPO), and the one AdamW +
schedule recipe they share. They wire models, losses and data together and hold no math of their own. May import
scoring, callbacks, generation, models, data_modules, core, world and errors."""
