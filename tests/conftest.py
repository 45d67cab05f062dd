"""Shared fixtures: the real composed config, shrunk; the world tokenizer; the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(rel: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"{p} absent (../shared/data is not beside this checkout)")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per process
    make small ops 10-100x slower (OpenMP waits): modules that use this run single-threaded."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tok(cache_dir):
    from llama2_lit.models.loading import load_tokenizer

    return load_tokenizer(kind="world_bpe", vocab_size=512, cache_dir=cache_dir)


SMALL = [
    "logger=none",
    "trainer.max_steps=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.synthetic.num_train=120",
    "data.synthetic.num_val=16",
    "data.synthetic.num_eval=4",
    "stage.seq_len=128",
    "stage.batch_size=4",
    "callbacks.gold_eval.max_new_tokens=4",
    "callbacks.gold_eval.at_start=false",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=2",
]


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose conf/config.yaml with `overrides` on top of a small, fast setting, writing into tmp_path."""
    from llama2_lit.config import compose

    def _make(*overrides: str, small: bool = True, out: Path | None = None):
        base = list(SMALL) if small else []
        return compose(base + [f"paths.output_dir={out or tmp_path}", f"paths.cache_dir={cache_dir}", *overrides])

    return _make
