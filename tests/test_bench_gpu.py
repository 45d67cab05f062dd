"""bench/gpu.py (make bench-gpu) stays runnable: its CPU smoke run (--tiny) fills every section with the expected
keys and positive finite figures, says it is a CPU run, and never writes bench/results/gpu.json."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"

TOP = {"device", "device_type", "tiny", "torch", "transformers", "lightning", "cuda", "gpu_memory_gib", "python",
       "precision", "peak_flops", "peak_flops_source", "mfu_formula", "settings", "started_at", "elapsed_s",
       "complete", "sections", "errors", "tracebacks"}
SETTINGS = {"shape", "dims", "vocab", "seq_len", "sft_batch", "rm_pairs", "warmup_steps", "max_timed_steps",
            "gen_batches", "prompt_tokens", "new_tokens", "ppo_prompts", "ppo_mini_batch", "ppo_new_tokens",
            "ppo_timed_iterations", "budget_s", "torch_threads", "compile", "float32_matmul_precision"}
SECTIONS = {"sft", "rm", "generate", "ppo", "memory", "generate_compiled"}
SFT = {"lightning_tokens_per_s", "plain_tokens_per_s", "ratio", "lightning_mfu", "plain_mfu", "flops_per_token",
       "tokens_per_step", "timed_steps_lightning", "timed_steps_plain", "peak_allocated_gib"}
RM = {"lightning_pairs_per_s", "plain_pairs_per_s", "ratio", "lightning_tokens_per_s", "plain_tokens_per_s",
      "lightning_mfu", "plain_mfu", "flops_per_token", "pairs_per_step", "row_tokens", "timed_steps_lightning",
      "timed_steps_plain", "peak_allocated_gib"}
GENERATE = {"prompt_tokens", "new_tokens", "dtype", "batches"}
GEN_ROW = {"batch", "hf_tokens_per_s", "engine_tokens_per_s", "engine_over_hf", "engine_calls",
           "engine_peak_allocated_gib", "hf_peak_allocated_gib"}
PPO = {"precision", "prompts_per_iteration", "mini_batch_size", "ppo_epochs", "prompt_tokens", "max_new_tokens",
       "iterations_timed", "seconds", "share", "samples_per_s", "generation_tokens_per_s", "response_tokens_mean",
       "peak_allocated_gib", "failed_attempts"}
SPLIT = {"generation", "scoring", "training"}
MEMORY = {"note", "phases"}
PHASE = {"measured_gib", "planned_gib", "ratio", "planned_train_gib", "planned_generation_gib"}
COMPILED = {"skipped", "batches"}
COMPILED_ROW = {"batch", "tokens_per_s", "over_hf", "first_call_s", "error", "traceback"}
# figures only a CUDA device can give (null on CPU); the planner's itemised components may be 0
CUDA_ONLY = ("peak_allocated_gib", "engine_peak_allocated_gib", "hf_peak_allocated_gib", "measured_gib")
MAY_BE_ZERO = ("planned_train_gib", "planned_generation_gib")


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (str(i),))
    else:
        yield path, obj


def _run(tmp_path, *args, timeout=240):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=timeout)
    after = DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None
    assert before == after, "bench/gpu.py --tiny touched bench/results/gpu.json"
    return res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out = tmp / "gpu_tiny.json"
    res = _run(tmp, "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_tiny_run_fills_every_section(tiny_run):
    d, stdout = tiny_run
    assert set(d) == TOP
    assert set(d["settings"]) == SETTINGS
    assert d["errors"] == {} and d["tracebacks"] == {} and d["complete"] is True and d["tiny"] is True
    assert set(d["sections"]) == SECTIONS
    sec = d["sections"]
    assert set(sec["sft"]) == SFT and set(sec["sft"]["peak_allocated_gib"]) == {"lightning", "plain"}
    assert set(sec["rm"]) == RM and set(sec["rm"]["peak_allocated_gib"]) == {"lightning", "plain"}
    assert set(sec["generate"]) == GENERATE
    assert [r["batch"] for r in sec["generate"]["batches"]] == d["settings"]["gen_batches"]
    assert all(set(r) == GEN_ROW for r in sec["generate"]["batches"])
    assert set(sec["ppo"]) == PPO and set(sec["ppo"]["seconds"]) == SPLIT and set(sec["ppo"]["share"]) == SPLIT
    assert sec["ppo"]["failed_attempts"] == [] and sec["ppo"]["iterations_timed"] >= 1
    assert abs(sum(sec["ppo"]["share"].values()) - 1) < 1e-9
    assert set(sec["memory"]) == MEMORY and set(sec["memory"]["phases"]) == {"sft", "rm", "generate", "ppo"}
    assert all(set(p) == PHASE for p in sec["memory"]["phases"].values())
    assert set(sec["generate_compiled"]) == COMPILED
    assert all(set(r) == COMPILED_ROW for r in sec["generate_compiled"]["batches"])

    cpu = d["device_type"] == "cpu"
    for path, v in _leaves(sec):
        where = "/".join(path)
        if path[0] == "generate_compiled" or path[-1] in ("note", "dtype", "precision"):
            continue
        if v is None:  # only CUDA-only figures may be missing, and only on CPU
            assert cpu and (any(p in CUDA_ONLY for p in path) or path[-1] == "ratio" and path[1] == "phases"), where
            continue
        assert isinstance(v, (int, float)) and not isinstance(v, bool), where
        assert math.isfinite(v), where
        assert v >= 0 if any(p in MAY_BE_ZERO for p in path) else v > 0, where
    assert d["peak_flops"] > 0 and math.isfinite(d["peak_flops"])
    if cpu:  # CPU figures are never presented as GPU ones
        assert d["device"].startswith("cpu") and "CPU run (--tiny)" in stdout and "NOT a GPU result" in stdout
        assert "not a vendor peak" in d["peak_flops_source"]
        assert all(p["measured_gib"] is None for p in sec["memory"]["phases"].values())
        assert sec["generate_compiled"]["skipped"] and sec["generate_compiled"]["batches"] == []


def test_tiny_never_writes_the_gpu_results():
    mod = _load()
    tmp_default = mod.resolve_out(None, tiny=True)
    assert tmp_default != DEFAULT_OUT.resolve() and DEFAULT_OUT.parent not in tmp_default.parents
    assert mod.resolve_out(None, tiny=False) == DEFAULT_OUT
    with pytest.raises(SystemExit, match="refusing"):
        mod.resolve_out(str(DEFAULT_OUT), tiny=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_gpu_run_refuses_cpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        _load().main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_tiny_ppo_under_bf16_mixed(tmp_path):
    """PPOModule with float32 masters under bf16-mixed samples (the engine runs in the autocast dtype) and trains."""
    out = tmp_path / "bf16.json"
    res = _run(tmp_path, "--precision", "bf16-mixed", "--sections", "ppo", "--no-ppo-fallback", "--out", str(out))
    d = json.loads(out.read_text())
    assert res.returncode == 0 and d["errors"] == {}, d["errors"]
    assert d["sections"]["ppo"]["precision"] == "bf16-mixed"


@pytest.mark.slow
def test_tiny_compiled_engine(tmp_path):
    """The compile=True path of the generation section (torch.compile on CPU: ~40 s on 2 cores)."""
    out = tmp_path / "compiled.json"
    res = _run(tmp_path, "--compile", "--sections", "generate,generate_compiled", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["sections"]["generate_compiled"]["batches"]
    assert len(rows) == 2 and all(set(r) == COMPILED_ROW for r in rows)
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows), rows
