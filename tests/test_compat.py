"""The private members of Lightning, torch and transformers this project relies on (issue 20): a release that drops
or renames one fails here by name, before a run fails far from the cause. pyproject.toml bounds the versions
(transformers>=5,<6, lightning>=2.6,<2.7); widening a bound means running this file first."""
from __future__ import annotations

import importlib

import pytest

# (module, attribute path, who uses it)
PRIVATE = [
    ("lightning.pytorch.callbacks", "ModelCheckpoint._should_skip_saving_checkpoint", "callbacks/checkpoint.py"),
    ("lightning.pytorch.callbacks", "ModelCheckpoint._save_checkpoint", "callbacks/checkpoint.py"),
    ("lightning.pytorch.callbacks", "ModelCheckpoint._should_save_on_train_epoch_end", "callbacks/checkpoint.py"),
    ("lightning.pytorch.callbacks", "ModelCheckpoint._save_topk_checkpoint", "callbacks/checkpoint.py"),
    ("lightning.pytorch.callbacks", "ModelCheckpoint._save_last_checkpoint", "callbacks/checkpoint.py"),
    ("lightning.pytorch.callbacks", "ModelCheckpoint._monitor_candidates", "callbacks/checkpoint.py"),
    ("lightning.pytorch.loops", "_TrainingEpochLoop._should_check_val_fx", "callbacks/checkpoint.py"),
    ("lightning.pytorch.loops", "_TrainingEpochLoop._should_accumulate", "callbacks/checkpoint.py"),
    ("lightning.pytorch.loops", "_FitLoop._should_accumulate", "callbacks/checkpoint.py"),
    ("lightning.pytorch.loops", "_FitLoop._load_combined_loader_states", "callbacks/resume.py"),
    ("lightning.pytorch.trainer.connectors.signal_connector", "_SignalConnector", "callbacks/preemption.py"),
    ("torch.utils.data", "DataLoader._index_sampler", "data_modules/resumable.py"),
    ("transformers.integrations.sdpa_attention", "repeat_kv", "llama2_lit/models/packed_attention.py"),
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward", "llama2_lit/models/packed_attention.py"),
    ("transformers.masking_utils", "AttentionMaskInterface", "llama2_lit/models/packed_attention.py"),
    ("transformers.masking_utils", "sdpa_mask", "llama2_lit/models/packed_attention.py"),
]
INSTANCE = [  # set in __init__, not on the class
    ("lightning.pytorch.callbacks", "ModelCheckpoint", ("_last_global_step_saved", "_last_checkpoint_saved"),
     "callbacks/checkpoint.py"),
]


@pytest.mark.parametrize("module, path, user", PRIVATE, ids=[p[1] for p in PRIVATE])
def test_private_member_still_exists(module, path, user):
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), (f"{module}.{path} is gone (used by {user}); this release of "
                                    f"{module.split('.')[0]} is outside the project's tested bounds")
        obj = getattr(obj, part)


@pytest.mark.parametrize("module, cls, attrs, user", INSTANCE, ids=[i[1] for i in INSTANCE])
def test_private_instance_attributes_still_exist(module, cls, attrs, user):
    obj = getattr(importlib.import_module(module), cls)()
    missing = [a for a in attrs if not hasattr(obj, a)]
    assert not missing, f"{module}.{cls} instances lack {missing} (used by {user})"


def test_the_trainer_keeps_its_signal_connector():
    import lightning as L

    t = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert hasattr(t, "_signal_connector") and hasattr(t._signal_connector, "received_sigterm"), (
        "Trainer._signal_connector.received_sigterm is gone (callbacks/preemption.py stops a run through it)")
    loop = t.fit_loop
    for name in ("_data_fetcher", "_combined_loader", "_combined_loader_states_to_load"):
        assert hasattr(loop, name), f"Trainer.fit_loop.{name} is gone (callbacks/resume.py, callbacks/checkpoint.py)"
