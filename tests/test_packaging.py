"""Install and run from anywhere (issue 20, part 1): the Hydra configs ship inside the package, outputs go under the
current directory and caches under the user's cache folder; a wheel installed (not editable) in a fresh venv runs
``llama2-lit stage=sft`` from another directory."""
from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT


def test_the_configs_ship_inside_the_package():
    import llama2_lit
    from llama2_lit.config import CONF_DIR

    conf = importlib.resources.files("llama2_lit") / "conf"
    for name in ("config.yaml", "stage/sft.yaml", "stage/dpo.yaml", "paths/default.yaml", "model/tiny.yaml"):
        assert (conf / name).is_file(), name
    assert CONF_DIR.parent == Path(llama2_lit.__file__).parent
    # every file of the top-level conf/ (the design card's place) is the package's: one set of configs
    assert sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")) == sorted(
        p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml"))


def test_outputs_follow_the_current_directory_and_caches_the_user_cache(tmp_path, monkeypatch):
    from llama2_lit.config import compose

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LLAMA2_LIT_CACHE", raising=False)
    cfg = compose(["paths.output_dir=x"])
    assert cfg.paths.output_root == f"{tmp_path}/outputs" and cfg.paths.checkpoints_dir == f"{tmp_path}/checkpoints"
    assert cfg.paths.cache_dir == f"{tmp_path}/xdg/llama2-lit"
    monkeypatch.setenv("LLAMA2_LIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("LLAMA2_LIT_SHARED_DATA", str(tmp_path / "data"))
    cfg = compose(["paths.output_dir=x"])
    assert cfg.paths.cache_dir == f"{tmp_path}/mine" and cfg.paths.shared_data == f"{tmp_path}/data"
    assert cfg.model.tokenizer.cache_dir == f"{tmp_path}/mine"


def test_a_wheel_installed_in_a_fresh_venv_runs_from_another_directory(tmp_path):
    """``pip install`` of the built wheel (not editable) into a new venv whose dependencies come from this one (a
    .pth line, no network), then ``cd elsewhere && llama2-lit stage=sft trainer.max_steps=5``."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("llama2_lit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, lightning, ... of .venv
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, env=env,
                   capture_output=True)
    where = subprocess.run([str(py), "-c", "import llama2_lit, llama2_lit.config as c; print(llama2_lit.__file__); "
                            "print(c.CONF_DIR.is_symlink())"], cwd=tmp_path, check=True, capture_output=True,
                           text=True).stdout.split()
    assert where[0].startswith(site) and where[1] == "False"  # the installed copy, its configs real files
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_env = {**env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
    run_env.pop("LLAMA2_LIT_CACHE", None)
    r = subprocess.run([str(venv / "bin" / "llama2-lit"), "stage=sft", "trainer.max_steps=5", "logger=none",
                        "data.synthetic.num_train=200", "data.synthetic.num_eval=8", "trainer.enable_progress_bar=false"],
                       cwd=elsewhere, env=run_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (elsewhere / "outputs" / "runs" / "sft").iterdir()
    assert (run / "metrics.json").is_file() and (run / "hf" / "config.json").is_file()
    assert (tmp_path / "cache" / "llama2-lit").is_dir()  # the world tokenizer was cached there
    assert not (Path(site) / "outputs").exists() and not (Path(site).parent / "outputs").exists()
