"""The world's honesty bounds (issue 16), measured on the shipped SFT recipes: the SFT policy must not solve the world
(held-out gold <= 0.6), and a perfect reward model must have room above it (the gold oracle's best of 16 T=1 samples
>= SFT gold + 0.15). Both the default stage=sft (model=tiny) and make demo's policy (the shape that
conf/scale/pipeline_tiny.yaml gives its SFT step) are checked. Slow: each trains its SFT run (1-3 minutes on 2 cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEMO_POLICY = [o for o in yaml.safe_load((Path(__file__).parents[1] / "conf/scale/pipeline_tiny.yaml").read_text())
               ["pipeline"]["sft_overrides"] if o.startswith("model.config.")]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [[], DEMO_POLICY], ids=["tiny", "demo_policy"])
def test_sft_leaves_room_for_rlhf(tmp_path, shape):
    out = tmp_path / "sft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "llama2_lit", "stage=sft", "logger=none", "callbacks.gold_eval.best_of=16",
                        f"paths.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false", *shape,
                        f"hydra.run.dir={out}"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    gold, best = m["eval/gold_helpfulness"], m["eval/gold_helpfulness_oracle_best_of"]
    assert m["eval/oracle_best_of_k"] == 16.0
    assert 0.2 < gold <= 0.6, gold  # learned something, solved not
    assert best >= gold + 0.15, (gold, best)
